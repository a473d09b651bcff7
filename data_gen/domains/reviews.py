"""`reviews`: product reviews that vary in sentiment, length, focus and tone.

Two variants share the domain name:
- `Reviews` (the default): four axes, users weigh them by a priority order (weights 8/4/2/1, so no
  ties), and test users hold *interpolated* trait combinations: every single value is seen in
  training, the combination is not.
- `QuickstartReviews` (`--preset quickstart`): a closed ~60-word vocabulary, two binary axes, short
  responses and minimal pairs, so a 3-layer model trained from scratch on CPU can learn in-context
  personalization: each trait value owns a small word set, the chosen response is the user's ideal
  one and the rejected one flips one axis. For a given question and pair, half the users prefer each
  side, so the label is invisible without shots.
"""

from __future__ import annotations

import itertools
import random

from fspo_engine.data_gen.domains.base import Question, TemplateDomain, pick

ITEMS = (
    "phone",
    "laptop",
    "headphones",
    "camera",
    "hotel room",
    "restaurant",
    "coffee maker",
    "backpack",
    "novel",
    "video game",
    "desk chair",
    "bicycle",
    "smartwatch",
    "tent",
    "blender",
    "sofa",
)
QUESTION_FORMS = (
    "Write a short review of the {item}.",
    "What did you think of the {item}?",
    "How would you rate the {item} you bought last month?",
    "Give your honest opinion of the {item}.",
    "Would you recommend the {item} to a friend?",
    "Review the {item} for other shoppers.",
)
SENTIMENT_WORDS = {
    "positive": ("great", "excellent", "impressive", "fantastic", "solid", "lovely"),
    "negative": ("poor", "disappointing", "awful", "mediocre", "terrible", "flimsy"),
}
VERDICT = {
    "positive": ("I would buy it again", "I recommend it", "it was worth every cent"),
    "negative": ("I would not buy it again", "I cannot recommend it", "it was a waste of money"),
}
FOCUS_WORDS = {
    "price": ("price", "value for money", "cost", "deal"),
    "quality": ("build quality", "materials", "durability", "craftsmanship"),
    "service": ("customer service", "support team", "delivery", "return process"),
    "design": ("design", "look", "style", "layout"),
}
TONE_OPENERS = {
    "casual": ("Honestly,", "Okay so", "Not gonna lie,", "Wow,"),
    "formal": ("Overall,", "In my assessment,", "To summarize,", "On balance,"),
}
TONE_CLOSERS = {"casual": ("!", " lol.", "!!", " tbh."), "formal": (".", ".", ".", ".")}
DETAILS = (
    "after two weeks of daily use",
    "compared with the one I had before",
    "for what I needed it for",
    "once I got used to it",
)
AXES = {
    "sentiment": ("positive", "negative"),
    "length": ("concise", "verbose"),
    "focus": ("price", "quality", "service", "design"),
    "tone": ("casual", "formal"),
}
_PHRASE = {
    "sentiment": {"positive": "upbeat, positive reviews", "negative": "critical, negative reviews"},
    "length": {"concise": "short, to-the-point answers", "verbose": "long, detailed write-ups"},
    "focus": {
        "price": "whether it is worth the money",
        "quality": "how well it is built",
        "service": "the service and support around it",
        "design": "how it looks",
    },
    "tone": {"casual": "a relaxed, chatty voice", "formal": "a measured, formal voice"},
}


class Reviews(TemplateDomain):
    name = "reviews"
    axes = AXES

    def heldout_combos(self, seed: int, test_fraction: float) -> frozenset:
        combos = sorted(itertools.product(*(AXES[a] for a in sorted(AXES))))
        k = round(test_fraction * len(combos))
        if test_fraction > 0:
            k = min(max(k, 1), len(combos) - 1)
        rng = random.Random(f"{seed}/reviews/heldout")
        return frozenset(rng.sample(combos, k))

    def sample_traits(self, rng, split, heldout):
        names = sorted(AXES)
        combos = sorted(itertools.product(*(AXES[a] for a in names)))
        pool = [c for c in combos if (c in heldout) == (split == "test")] or combos
        traits = dict(zip(names, rng.choice(pool)))
        order = names[:]
        rng.shuffle(order)
        traits["priority"] = ",".join(order)
        return traits

    def describe(self, traits, rng):
        order = traits["priority"].split(",")
        first, second = order[0], order[1]
        likes = ", ".join(_PHRASE[a][traits[a]] for a in ("sentiment", "length", "tone"))
        return (
            f"This reviewer prefers {likes}, and cares about {_PHRASE['focus'][traits['focus']]}. "
            f"What matters most to them is the {first}, then the {second}."
        )

    def sample_question(self, rng):
        item = rng.choice(ITEMS)
        return Question(rng.choice(QUESTION_FORMS).format(item=item), {"item": item})

    def compose(self, question, attrs, draws):
        s, f, t = attrs["sentiment"], attrs["focus"], attrs["tone"]
        item = question.slots["item"]
        opener = pick(TONE_OPENERS[t], draws[0])
        closer = pick(TONE_CLOSERS[t], draws[1])
        focus, sentiment = pick(FOCUS_WORDS[f], draws[2]), pick(SENTIMENT_WORDS[s], draws[3])
        text = f"{opener} the {focus} of this {item} is {sentiment}"
        if attrs["length"] == "verbose":
            text += (
                f" {pick(DETAILS, draws[4])}, the {pick(FOCUS_WORDS[f], draws[5])} felt"
                f" {pick(SENTIMENT_WORDS[s], draws[6])} too, and {pick(VERDICT[s], draws[7])}"
            )
        return text + closer

    def score(self, traits, attrs):
        order = traits["priority"].split(",")
        return float(sum(2 ** (len(order) - 1 - i) for i, a in enumerate(order) if attrs[a] == traits[a]))


# --- quickstart: small closed vocabulary, two binary axes, minimal pairs ------------------------
QS_ITEMS = ("phone", "laptop", "camera", "hotel", "cafe", "movie", "book", "game", "chair", "lamp")
QS_QUESTIONS = (
    "how is the {item}?",
    "what about the {item}?",
    "review the {item}.",
    "is the {item} good?",
)
# Each trait value owns four words that appear only in responses carrying it.
QS_SENTIMENT = {
    "positive": ("great", "lovely", "superb", "excellent"),
    "negative": ("awful", "poor", "terrible", "bad"),
}
QS_FOCUS = {
    "price": ("price", "cost", "value", "deal"),
    "quality": ("build", "design", "finish", "quality"),
}
# {s} sentiment word, {f} focus word, {item}: 3-8 words, two sentiment and one or two focus slots.
QS_TEMPLATES = (
    "the {f} is {s}, so {s2}.",
    "{s} {f}, {s2} {item}.",
    "i found the {f} {s} and {s2}.",
    "this {item} has {s} {f}, really {s2}.",
    "{s} {item}, the {f} is {s2}.",
    "{s} {f} and {s2} {f2}.",
)
QS_AXES = {"sentiment": ("positive", "negative"), "focus": ("price", "quality")}


class QuickstartReviews(TemplateDomain):
    name = "reviews"
    axes = QS_AXES
    minimal_pairs = True

    def sample_traits(self, rng, split, heldout):
        return {axis: rng.choice(values) for axis, values in sorted(QS_AXES.items())}

    def describe(self, traits, rng):
        return f"this user likes {traits['sentiment']} reviews about the {traits['focus']}."

    def sample_question(self, rng):
        item = rng.choice(QS_ITEMS)
        return Question(rng.choice(QS_QUESTIONS).format(item=item), {"item": item})

    def compose(self, question, attrs, draws):
        s, f = QS_SENTIMENT[attrs["sentiment"]], QS_FOCUS[attrs["focus"]]
        # Two distinct words of a set: the second index is offset, never equal to the first.
        s1, s2 = draws[1] % 4, (draws[1] + 1 + draws[2] % 3) % 4
        f1, f2 = draws[3] % 4, (draws[3] + 1 + draws[4] % 3) % 4
        return pick(QS_TEMPLATES, draws[0]).format(
            s=s[s1], s2=s[s2], f=f[f1], f2=f[f2], item=question.slots["item"]
        )

    def score(self, traits, attrs):
        return float(sum(attrs[a] == traits[a] for a in QS_AXES))
