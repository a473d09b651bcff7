"""`roleplay`: open-ended personas composed from many attributes, answering everyday requests.

Personas combine an age band, an occupation, a core value, a hard constraint (diet, budget, no car,
...) and a conversational style; the combination space is large, so test users are practically
always unseen combinations. A response carries the value it appeals to, the constraint it is
tailored to (a suggestion that ignores the user's constraint is strongly dispreferred) and a style.
"""

from __future__ import annotations

import itertools

from fspo_engine.data_gen.domains.base import Question, TemplateDomain, phrase_stated, read_by_markers

AGE_BANDS = ("teens", "twenties", "thirties", "forties", "fifties", "sixties or older")
OCCUPATIONS = (
    "nurse",
    "teacher",
    "software engineer",
    "farmer",
    "student",
    "chef",
    "retired engineer",
    "lawyer",
    "bus driver",
    "graphic designer",
    "electrician",
    "researcher",
)
VALUES = ("family", "adventure", "thrift", "health", "creativity", "comfort")
CONSTRAINTS = ("vegetarian", "tight budget", "no car", "night shifts", "none")
STYLES = ("brief", "warm", "humorous", "detailed")
REQUESTS = {
    "dinner": ("What should I cook for dinner tonight?", "Suggest a meal for this evening."),
    "weekend": ("What should I do this weekend?", "Plan my Saturday for me."),
    "gift": ("Recommend a gift for my best friend.", "What present should I buy for my sister?"),
    "bonus": ("How should I spend a small bonus?", "I got some extra money, what should I do with it?"),
    "trip": ("Help me plan a short trip.", "Where should I go for a two-day break?"),
}
# request -> value -> suggestion
SUGGEST = {
    "dinner": {
        "family": "a big pot of soup everyone can share",
        "adventure": "a spicy dish from a cuisine you have never tried",
        "thrift": "rice and beans with whatever vegetables are left",
        "health": "a grain bowl with greens and roasted vegetables",
        "creativity": "homemade dumplings with your own fillings",
        "comfort": "a baked pasta with plenty of cheese",
    },
    "weekend": {
        "family": "a picnic with the whole family",
        "adventure": "a hike up a trail you have not done",
        "thrift": "the free museum day and a walk in the park",
        "health": "a long run and an early night",
        "creativity": "a painting or pottery workshop",
        "comfort": "a slow morning, a good book and a nap",
    },
    "gift": {
        "family": "a framed photo of a shared memory",
        "adventure": "a voucher for a climbing session",
        "thrift": "a handwritten letter and homemade cookies",
        "health": "a good water bottle and a yoga mat",
        "creativity": "a sketchbook with quality pencils",
        "comfort": "a soft blanket and fancy tea",
    },
    "bonus": {
        "family": "a day out with your kids or parents",
        "adventure": "saving it for a bigger trip",
        "thrift": "putting all of it into savings",
        "health": "a few sessions with a good trainer",
        "creativity": "a class in something you always wanted to learn",
        "comfort": "a better mattress",
    },
    "trip": {
        "family": "a seaside town with things for all ages",
        "adventure": "a mountain village with rough trails",
        "thrift": "a cheap hostel in a nearby city",
        "health": "a spa town with hot springs",
        "creativity": "an art town full of galleries and workshops",
        "comfort": "a quiet cabin with a fireplace",
    },
}
FITS = {  # constraint -> clause that tailors the suggestion to it
    "vegetarian": "keeping it fully vegetarian",
    "tight budget": "keeping the cost under twenty dollars",
    "no car": "with everything reachable by bus or on foot",
    "night shifts": "timed around sleeping during the day",
    "none": "with a splurge on something special",  # ignores every constraint
}
STYLE_FRAME = {
    "brief": "Try {s}, {fit}.",
    "warm": "Oh, you deserve something nice! How about {s}, {fit}? I hope you enjoy it.",
    "humorous": "Plot twist: {s}, {fit}. Your future self will send a thank-you card.",
    "detailed": "I would suggest {s}, {fit}. Start early, prepare what you need the day before, "
    "and leave some slack in the plan.",
}
AXES = {"value": VALUES, "fits": CONSTRAINTS, "style": STYLES}
_CONSTRAINT_SENTENCE = {
    "vegetarian": "They are vegetarian.",
    "tight budget": "Money is tight for them right now.",
    "no car": "They do not own a car.",
    "night shifts": "They work night shifts.",
    "none": "They have no particular restrictions and like to treat themselves.",
}
# What reads a response back: every request's suggestion for a value, each constraint's clause, and the
# fixed words of each style's frame.
_MARKERS = {
    "value": {v: tuple(SUGGEST[r][v] for r in sorted(SUGGEST)) for v in VALUES},
    "fits": {c: (FITS[c],) for c in CONSTRAINTS},
    "style": {"brief": ("Try",), "warm": ("you deserve something nice",), "humorous": ("Plot twist",),
              "detailed": ("I would suggest",)},
}


class Roleplay(TemplateDomain):
    name = "roleplay"
    axes = AXES

    def sample_traits(self, rng, split, heldout):
        return {
            "age": rng.choice(AGE_BANDS),
            "occupation": rng.choice(OCCUPATIONS),
            "value": rng.choice(VALUES),
            "constraint": rng.choice(CONSTRAINTS),
            "style": rng.choice(STYLES),
        }

    def describe(self, traits, rng):
        constraint = _CONSTRAINT_SENTENCE[traits["constraint"]]
        return (
            f"A {traits['occupation']} in their {traits['age']} who values {traits['value']} above all. "
            f"{constraint} They like {traits['style']} replies."
        )

    def ideal(self, traits):
        return {"value": traits["value"], "fits": traits["constraint"], "style": traits["style"]}

    def sample_question(self, rng):
        request = rng.choice(sorted(REQUESTS))
        return Question(rng.choice(REQUESTS[request]), {"request": request})

    def compose(self, question, attrs, draws):
        suggestion = SUGGEST[question.slots["request"]][attrs["value"]]
        return STYLE_FRAME[attrs["style"]].format(s=suggestion, fit=FITS[attrs["fits"]])

    def score(self, traits, attrs):
        # Ignoring a hard constraint outweighs everything else.
        return (
            4.0 * (attrs["fits"] == traits["constraint"])
            + 2.0 * (attrs["value"] == traits["value"])
            + 1.0 * (attrs["style"] == traits["style"])
        )

    def read_attrs(self, text):
        return read_by_markers(text, _MARKERS)

    def trait_space(self):
        # age and occupation shape the description only: the score reads these three.
        return [{"value": v, "constraint": c, "style": st} for v, c, st in itertools.product(VALUES, CONSTRAINTS, STYLES)]

    def stated_traits(self, description, traits):
        return {
            "age": phrase_stated(description, {a: f"in their {a}" for a in AGE_BANDS}, traits["age"]),
            "occupation": phrase_stated(description, {o: f"A {o} in" for o in OCCUPATIONS}, traits["occupation"]),
            "value": phrase_stated(description, {v: f"values {v}" for v in VALUES}, traits["value"]),
            "constraint": phrase_stated(description, _CONSTRAINT_SENTENCE, traits["constraint"]),
            "style": phrase_stated(description, {s: f"like {s} replies" for s in STYLES}, traits["style"]),
        }
