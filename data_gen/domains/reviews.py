"""`reviews`: product reviews that vary in sentiment, length, focus and tone.

Two variants share the domain name:
- `Reviews` (the default): four axes, users weigh them by a priority order (weights 8/4/2/1, so no
  ties), and test users hold *interpolated* trait combinations: every single value is seen in
  training, the combination is not.
- `QuickstartReviews` (`--preset quickstart`): a closed vocabulary, four traits of four values, terse
  responses, so that a 2-layer model trained from scratch on CPU can learn in-context personalization, and
  so that it has to: each trait value is one word, a pair is two responses that differ on one axis and
  mention no others (not the user's ideal response), so one shot reveals one trait of the user and the
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

    def val_combos(self, seed, val_fraction, test):
        rest = [c for c in sorted(itertools.product(*(AXES[a] for a in sorted(AXES)))) if c not in test]
        k = min(max(round(val_fraction * (len(rest) + len(test))), 1), len(rest) - 1) if val_fraction > 0 else 0
        return frozenset(random.Random(f"{seed}/reviews/val-heldout").sample(rest, k))

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


# --- quickstart presets: small closed vocabularies, one word per value ----------------------------
QS_ITEMS = ("phone", "laptop", "camera", "hotel", "cafe", "movie", "book", "game", "chair", "lamp")
QS_QUESTIONS = (
    "how is the {item}?",
    "what about the {item}?",
    "review the {item}.",
    "is the {item} good?",
)
# The quickstart preset's questions and responses are terse ("the phone?" -> "phone great price."): fewer
# tokens per shot made 8-shot episodes ~27% shorter, and Pref-FT learnt the in-context inference sooner per
# CPU minute than with sentences (benchmarks/RESULTS.md, quickstart tuning).
QS4_QUESTIONS = ("the {item}?", "{item}?")
# The quickstart preset's four traits, four values each, every value worded by one word that only responses
# carrying it use. The description states the same words ("likes great, build, wow, home."), so a value is
# one token that the model copies from the shots into the description and from the description into its
# answer; with trait names in the description instead ("positive", "casual") it first had to learn the word
# each name stands for.
QS_TRAIT_WORDS = {
    "focus": {"price": "price", "quality": "build", "design": "design", "service": "service"},
    "sentiment": {"positive": "great", "negative": "awful", "mixed": "mixed", "neutral": "fine"},
    "tone": {"casual": "wow", "formal": "overall", "playful": "haha", "blunt": "frankly"},
    "use": {"home": "home", "work": "work", "travel": "travel", "school": "school"},
}
QS_AXES = {axis: tuple(words) for axis, words in QS_TRAIT_WORDS.items()}
# Test users hold held-out trait combinations, as whole orbits: a combination and its three shifts (every
# trait moved to its next value, cyclically), so that each trait value keeps exactly a quarter of the training
# users. Few orbits of many combinations (2 x 4 of 256): the training users then cover most combinations
# once or twice, and cannot tell the held-out ones from the others they happen not to cover. With few
# combinations (six binary traits, 64) the training users covered all but the held-out ones, and a model that
# learnt their prior wrote the test users' unrevealed traits *against* the shots' evidence: a predictor
# believing that prior scored 0.51/0.56/0.72/0.75 at 1/2/4/8 shots where the population-prior reference was
# 0.62/0.71/0.83/0.94.
QS_HELDOUT_ORBITS = 2
# The quickstart-easy preset's words: each trait value owns a small set, used two at a time.
QS_SENTIMENT = {
    "positive": ("great", "lovely", "superb", "excellent"),
    "negative": ("awful", "poor", "terrible", "bad"),
}
QS_FOCUS = {
    "price": ("price", "cost", "value", "deal"),
    "quality": ("build", "design", "finish", "quality"),
}
QS_WORDS = {"sentiment": QS_SENTIMENT, "focus": QS_FOCUS}


def _two(words, r1: int, r2: int) -> tuple[str, str]:
    """Two words of a set, distinct when it has more than one: the second index is offset from the first."""
    n = len(words)
    i = r1 % n
    return words[i], words[(i + 1 + r2 % (n - 1)) % n if n > 1 else i]


class QuickstartReviews(TemplateDomain):
    """Four traits of four values. A pair contrasts one trait and says nothing about the others: both
    responses mention only that axis, with different values, and the chosen one carries the user's value, so a
    shot reveals exactly one trait of the user. Two-trait pairs (one or two, as the other template domains)
    also made pairs whose chosen side matched the user on only one of its two traits; the descriptions the
    model wrote then copied the other one too, and 8-shot accuracy stayed 0.08 below the population-prior
    reference (benchmarks/RESULTS.md). With the other axes filled in at random instead, Pref-FT's signal was too weak
    for a 3-layer model to learn from in CPU minutes."""

    name = "reviews"
    axes = QS_AXES
    contrast_only = True  # responses mention only the axes their pair contrasts (`draw_attrs`)
    changed_axes = (1,)

    def heldout_combos(self, seed, test_fraction):
        # Whole orbits (see QS_HELDOUT_ORBITS), whatever the test fraction of users: every trait value keeps
        # the same share of the training users, so a model that learnt "most users like X" from an
        # unbalanced training split cannot score below chance on the test users without shots.
        if test_fraction <= 0:
            return frozenset()
        names = sorted(QS_AXES)
        size = len(QS_AXES[names[0]])
        assert all(len(QS_AXES[a]) == size for a in names), "orbits need axes of one size"
        starts = [c for c in itertools.product(range(size), repeat=len(names)) if c[0] == 0]
        chosen = random.Random(f"{seed}/reviews-quickstart/heldout").sample(starts, QS_HELDOUT_ORBITS)
        return self._orbits(chosen)

    def val_combos(self, seed, val_fraction, test):
        # As many whole orbits as the test users have, drawn among the others.
        if val_fraction <= 0:
            return frozenset()
        size = len(QS_AXES[sorted(QS_AXES)[0]])
        starts = [c for c in itertools.product(range(size), repeat=len(QS_AXES)) if c[0] == 0]
        free = [c for c in starts if not self._orbits([c]) & test]
        return self._orbits(random.Random(f"{seed}/reviews-quickstart/val-heldout").sample(free, QS_HELDOUT_ORBITS))

    def _orbits(self, starts) -> frozenset:
        """The trait combinations of the orbits (a combination and its cyclic shifts) of `starts`."""
        names = sorted(QS_AXES)
        size = len(QS_AXES[names[0]])
        return frozenset(tuple(QS_AXES[a][(i + shift) % size] for a, i in zip(names, c))
                         for c in starts for shift in range(size))

    def sample_traits(self, rng, split, heldout):
        names = sorted(QS_AXES)
        combos = sorted(itertools.product(*(QS_AXES[a] for a in names)))
        pool = [c for c in combos if (c in heldout) == (split == "test")] or combos
        return dict(zip(names, rng.choice(pool)))

    def describe(self, traits, rng):
        # The value words in axis order, the order responses use too.
        return "likes " + ", ".join(QS_TRAIT_WORDS[a][traits[a]] for a in sorted(QS_AXES)) + "."

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
            b[axis] = rng.choice([v for v in QS_AXES[axis] if v != a[axis]])
        return a, b, changed

    def pair_proposal(self, traits):
        names = sorted(QS_AXES)
        out = []
        for k in sorted(set(self.changed_axes)):
            p_k = self.changed_axes.count(k) / len(self.changed_axes)
            for moved in itertools.combinations(names, k):
                sides = [[(v, w) for v in QS_AXES[n] for w in QS_AXES[n] if w != v] for n in moved]
                p = p_k / math.comb(len(names), k) / math.prod(len(s) for s in sides)
                for values in itertools.product(*sides):
                    a, b = dict.fromkeys(names), dict.fromkeys(names)
                    for n, (v, w) in zip(moved, values):
                        a[n], b[n] = v, w
                    out.append((a, b, p))
        return out

    def compose(self, question, attrs, draws):
        # The item, then the contrasted values in axis order: "phone great.", "lamp build wow.". Item first,
        # so that every value word follows a space and is one and the same token wherever it stands (and in
        # the description); a response-initial word is a different token from the same word after a space.
        return " ".join([question.slots["item"], *(QS_TRAIT_WORDS[a][attrs[a]] for a in sorted(QS_AXES) if attrs[a])]) + "."

    def score(self, traits, attrs):
        return float(sum(attrs[a] == traits[a] for a in QS_AXES))

    def read_attrs(self, text):
        return read_by_markers(text, {a: {v: (w,) for v, w in words.items()} for a, words in QS_TRAIT_WORDS.items()})

    def trait_space(self):
        return TemplateDomain.attribute_space(self)  # one value per trait, uniform

    def stated_traits(self, description, traits):
        return {a: phrase_stated(description, QS_TRAIT_WORDS[a], traits[a]) for a in QS_AXES}


QS_EASY_AXES = {"sentiment": ("positive", "negative"), "focus": ("price", "quality")}
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
