"""Prompts and reply validators for LLM response generation (the judge's live in labeler.py).

Every prompt asks for one JSON object and names its keys; validators return the clean value or raise
ValueError(reason), which `ChatBackend.chat_json` turns into a retry and finally a MalformedReply.
The first line "Task: ..." names the request kind (useful in server logs and to test doubles).
"""

from __future__ import annotations

SYSTEM = "You are a helpful writer. You reply with one JSON object and nothing else."


def _chat(user_content: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user_content}]


def views_messages(question: str, k: int) -> list[dict]:
    return _chat(
        "Task: views\n"
        f"Question: {question}\n"
        f"List {k} clearly different views an answer to this question could take: different opinions, "
        "audiences, tones, levels of detail or priorities. Reply with JSON: "
        '{"views": ["<one-sentence view>", ...]}'
    )


def response_messages(question: str, view: str) -> list[dict]:
    return _chat(
        "Task: respond\n"
        f"Question: {question}\n"
        f"Answer the question taking this view: {view}\n"
        'Keep the answer under 120 words. Reply with JSON: {"response": "<the answer>"}'
    )


def persona_messages(question: str, description: str) -> list[dict]:
    return _chat(
        "Task: respond\n"
        f"Question: {question}\n"
        f"Write the answer that this user would like best. User: {description}\n"
        'Keep the answer under 120 words. Reply with JSON: {"response": "<the answer>"}'
    )


def valid_views(obj: dict) -> list[str]:
    views = obj.get("views")
    if not isinstance(views, list) or not all(isinstance(v, str) for v in views):
        raise ValueError('"views" must be a list of strings')
    clean = []
    for v in (" ".join(v.split()) for v in views):
        if v and v not in clean:
            clean.append(v)
    if len(clean) < 2:
        raise ValueError('"views" needs at least 2 distinct non-empty views')
    return clean


def valid_response(obj: dict) -> str:
    text = obj.get("response")
    if not isinstance(text, str) or not text.strip():
        raise ValueError('"response" must be a non-empty string')
    return text.strip()
