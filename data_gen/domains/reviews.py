"""`reviews`: product reviews that vary in sentiment, length, focus and tone.

Two variants share the domain name:
- `Reviews` (the default): four axes, users weigh them by a priority order (weights 8/4/2/1, so no
  ties), and test users hold *interpolated* trait combinations: every single value is seen in
  training, the combination is not.
- `QuickstartReviews` (`--preset quickstart`): a closed vocabulary, four binary axes, short responses,
  so that a 3-layer model trained from scratch on CPU can learn in-context personalization, and so that
  it has to: each trait value owns a small word set, a pair is two random attribute vectors that differ
  on one or two axes (not the user's ideal response), so one shot reveals only part of the user and the
  information accumulates with shots. Test users hold trait combinations no training user has.
- `QuickstartEasyReviews` (`--preset quickstart-easy`): two binary axes and minimal pairs (chosen is the
  user's ideal response, rejected flips one axis), so a single shot reveals every trait: a step curve,
  learnt in a few hundred steps (fast tests).
For a given question and pair, half the users prefer each side, so the label is invisible without shots.
"""

from __future__ import annotations

import itertools
import math
import random

from fspo_engine.data_gen.domains.base import Question, TemplateDomain, phrase_stated, pick, read_by_markers

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

    def read_attrs(self, text):
        markers = {
            "sentiment": SENTIMENT_WORDS,
            "focus": FOCUS_WORDS,
            "tone": {t: tuple(o.rstrip(",") for o in TONE_OPENERS[t]) for t in TONE_OPENERS},
            "length": {"verbose": DETAILS},
        }
        return read_by_markers(text, markers, default={"length": "concise"})

    def trait_space(self):
        names = sorted(AXES)
        return [
            {**dict(zip(names, combo)), "priority": ",".join(order)}
            for combo in itertools.product(*(AXES[a] for a in names))
            for order in itertools.permutations(names)
        ]

    def stated_traits(self, description, traits):
        stated = {a: phrase_stated(description, _PHRASE[a], traits[a]) for a in AXES}
        first, second = traits["priority"].split(",")[:2]
        stated["priority"] = f"is the {first}, then the {second}" in description
        return stated


# --- quickstart presets: small closed vocabularies, binary axes --------------------------------
QS_ITEMS = ("phone", "laptop", "camera", "hotel", "cafe", "movie", "book", "game", "chair", "lamp")
QS_QUESTIONS = (
    "how is the {item}?",
    "what about the {item}?",
    "review the {item}.",
    "is the {item} good?",
)
# The four-trait preset's questions and responses are terse ("the phone?" -> "great price phone."): fewer
# tokens per shot made 8-shot episodes ~27% shorter, and Pref-FT learnt the in-context inference sooner per
# CPU minute than with sentences (benchmarks/RESULTS.md, quickstart tuning).
QS4_QUESTIONS = ("the {item}?", "{item}?")
# Each trait value owns four words that appear only in responses carrying it.
QS_SENTIMENT = {
    "positive": ("great", "lovely", "superb", "excellent"),
    "negative": ("awful", "poor", "terrible", "bad"),
}
QS_FOCUS = {
    "price": ("price", "cost", "value", "deal"),
    "quality": ("build", "design", "finish", "quality"),
}
QS_TONE = {"casual": ("wow", "yeah"), "formal": ("overall", "indeed")}
QS_USE = {"home": ("home", "family"), "work": ("work", "office")}
QS_AXES = {"sentiment": tuple(QS_SENTIMENT), "focus": tuple(QS_FOCUS), "tone": tuple(QS_TONE), "use": tuple(QS_USE)}
QS_WORDS = {"sentiment": QS_SENTIMENT, "focus": QS_FOCUS, "tone": QS_TONE, "use": QS_USE}
# How many words of each set a four-trait response may use (the first ones): one word per value, so that a
# value is one token the model can match across shots, not a set of synonyms to learn first.
QS_VARIANTS = 1


def _two(words, r1: int, r2: int) -> tuple[str, str]:
    """Two words of a set, distinct when it has more than one: the second index is offset from the first."""
    n = len(words)
    i = r1 % n
    return words[i], words[(i + 1 + r2 % (n - 1)) % n if n > 1 else i]


class QuickstartReviews(TemplateDomain):
    """Four binary traits. A pair contrasts one or two of them and says nothing about the others: both
    responses mention only the contrasted axes, with opposite values, so a shot reveals exactly those traits
    of the user (the chosen side carries the user's values) and nothing else. With the other axes filled in
    at random instead, Pref-FT's signal (the chosen response matches the user on an axis 2/3 of the time) was
    too weak for a 3-layer model to learn from in CPU minutes (benchmarks/RESULTS.md)."""

    name = "reviews"
    axes = QS_AXES
    contrast_only = True  # responses mention only the axes their pair contrasts (`draw_attrs`)

    def heldout_combos(self, seed, test_fraction):
        # Held out in complementary pairs (a combination and its opposite on every axis), so that each
        # trait value keeps exactly half of the training users: a model that learnt "most users like X"
        # from an unbalanced training split would score below chance on the test users without shots.
        names = sorted(QS_AXES)
        combos = sorted(itertools.product(*(QS_AXES[a] for a in names)))
        first = {a: QS_AXES[a][0] for a in names}
        pairs = [(c, tuple(v for a, x in zip(names, c) for v in QS_AXES[a] if v != x))
                 for c in combos if c[0] == first[names[0]]]
        k = min(max(round(test_fraction * len(pairs)), 1), len(pairs) - 1) if test_fraction > 0 else 0
        chosen = random.Random(f"{seed}/reviews-quickstart/heldout").sample(pairs, k)
        return frozenset(c for pair in chosen for c in pair)

    def sample_traits(self, rng, split, heldout):
        names = sorted(QS_AXES)
        combos = sorted(itertools.product(*(QS_AXES[a] for a in names)))
        pool = [c for c in combos if (c in heldout) == (split == "test")] or combos
        return dict(zip(names, rng.choice(pool)))

    def describe(self, traits, rng):
        return f"likes {traits['sentiment']}, {traits['focus']}, {traits['tone']}, {traits['use']}."

    def sample_question(self, rng):
        item = rng.choice(QS_ITEMS)
        return Question(rng.choice(QS4_QUESTIONS).format(item=item), {"item": item})

    # A response's attributes: a value, or None for an axis it does not mention.
    def attribute_space(self):
        names = sorted(QS_AXES)
        return [dict(zip(names, v)) for v in itertools.product(*((*QS_AXES[a], None) for a in names))]

    def draw_attrs(self, traits, rng):
        names = sorted(QS_AXES)
        changed = sorted(rng.sample(names, rng.choice(self.changed_axes)))
        a, b = dict.fromkeys(names), dict.fromkeys(names)
        for axis in changed:
            a[axis] = rng.choice(QS_AXES[axis])
            (b[axis],) = (v for v in QS_AXES[axis] if v != a[axis])
        return a, b, changed

    def pair_proposal(self, traits):
        names = sorted(QS_AXES)
        out = []
        for k in sorted(set(self.changed_axes)):
            p_k = self.changed_axes.count(k) / len(self.changed_axes)
            for moved in itertools.combinations(names, k):
                for values in itertools.product(*(QS_AXES[n] for n in moved)):
                    a, b = dict.fromkeys(names), dict.fromkeys(names)
                    for n, v in zip(moved, values):
                        a[n] = v
                        (b[n],) = (x for x in QS_AXES[n] if x != v)
                    out.append((a, b, p_k / math.comb(len(names), k) / 2**k))
        return out

    def compose(self, question, attrs, draws):
        # The contrasted values first, in axis order, then the item: "great price phone.", "wow work lamp."
        words = [pick(QS_WORDS[a][attrs[a]][:QS_VARIANTS], draws[1 + i])
                 for i, a in enumerate(sorted(QS_AXES)) if attrs[a]]
        return " ".join([*words, question.slots["item"]]) + "."

    def score(self, traits, attrs):
        return float(sum(attrs[a] == traits[a] for a in QS_AXES))

    def read_attrs(self, text):
        return read_by_markers(text, QS_WORDS)

    def trait_space(self):
        return TemplateDomain.attribute_space(self)  # one binary trait per axis, uniform

    def stated_traits(self, description, traits):
        return {a: phrase_stated(description, {v: v for v in QS_AXES[a]}, traits[a]) for a in QS_AXES}


QS_EASY_AXES = {"sentiment": QS_AXES["sentiment"], "focus": QS_AXES["focus"]}
# {s} sentiment word, {f} focus word, {item}: 3-8 words, two sentiment and one or two focus slots.
QS_EASY_TEMPLATES = (
    "the {f} is {s}, so {s2}.",
    "{s} {f}, {s2} {item}.",
    "i found the {f} {s} and {s2}.",
    "this {item} has {s} {f}, really {s2}.",
    "{s} {item}, the {f} is {s2}.",
    "{s} {f} and {s2} {f2}.",
)


class QuickstartEasyReviews(TemplateDomain):
    """Two binary traits and minimal pairs: one shot reveals the whole user."""

    name = "reviews"
    axes = QS_EASY_AXES
    minimal_pairs = True

    def sample_traits(self, rng, split, heldout):
        return {axis: rng.choice(values) for axis, values in sorted(QS_EASY_AXES.items())}

    def describe(self, traits, rng):
        return f"this user likes {traits['sentiment']} reviews about the {traits['focus']}."

    def sample_question(self, rng):
        item = rng.choice(QS_ITEMS)
        return Question(rng.choice(QS_QUESTIONS).format(item=item), {"item": item})

    def compose(self, question, attrs, draws):
        s, s2 = _two(QS_SENTIMENT[attrs["sentiment"]], draws[1], draws[2])
        f, f2 = _two(QS_FOCUS[attrs["focus"]], draws[3], draws[4])
        return pick(QS_EASY_TEMPLATES, draws[0]).format(s=s, s2=s2, f=f, f2=f2, item=question.slots["item"])

    def score(self, traits, attrs):
        return float(sum(attrs[a] == traits[a] for a in QS_EASY_AXES))

    def read_attrs(self, text):
        return read_by_markers(text, {a: QS_WORDS[a] for a in QS_EASY_AXES})

    def trait_space(self):
        return self.attribute_space()

    def stated_traits(self, description, traits):
        return {a: phrase_stated(description, {v: v for v in QS_EASY_AXES[a]}, traits[a]) for a in QS_EASY_AXES}
