"""`elix`: explain a concept to users of different education levels, interests and format tastes.

A response carries a reading level (the five ELIX levels), an analogy drawn from one interest, and a
format. The user's score is dominated by the distance between the response's level and theirs
(ordinal, so "teen" is closer to "preteen" than to "expert"), then by whether the analogy touches
one of their interests, then by format.
"""

from __future__ import annotations

import itertools

from fspo_engine.data_gen.domains.base import (
    Question,
    TemplateDomain,
    contains,
    phrase_stated,
    pick,
    read_by_markers,
)

LEVELS = ("child", "preteen", "teen", "young_adult", "expert")
INTERESTS = ("sports", "music", "cooking", "space", "animals", "video games")
FORMATS = ("steps", "story", "summary")
# topic -> (plain core, technical core)
TOPICS = {
    "why the sky is blue": (
        "sunlight bounces off tiny bits of air, and blue light bounces the most",
        "Rayleigh scattering off N2 and O2 molecules scales as 1/wavelength^4, so short wavelengths dominate",
    ),
    "how vaccines work": (
        "a vaccine shows your body a harmless copy of a germ so it learns to fight it",
        "antigen exposure primes B and T cells, producing memory cells and neutralizing antibodies",
    ),
    "what causes the seasons": (
        "the Earth is tilted, so each half gets more direct sunlight for part of the year",
        "the 23.4 degree axial obliquity changes insolation angle and day length over the orbit",
    ),
    "how a plane stays up": (
        "the wings push air down, and the air pushes the plane up",
        "wing camber and angle of attack produce a pressure differential and downwash, yielding lift",
    ),
    "why ice floats": (
        "water spreads out a little when it freezes, so ice is lighter than the same amount of water",
        "hydrogen bonding locks ice into an open hexagonal lattice that is about 9 percent less dense",
    ),
    "how computers store numbers": (
        "computers keep numbers as long rows of on and off switches",
        "integers are stored in two's complement binary and reals as IEEE 754 sign, exponent and mantissa",
    ),
    "what photosynthesis is": (
        "plants use sunlight to turn air and water into their food",
        "chlorophyll absorbs photons to drive the light reactions and the Calvin cycle fixing CO2",
    ),
    "why we dream": (
        "while you sleep your brain sorts through the day and plays little movies",
        "REM-sleep activity may support memory consolidation and emotional processing",
    ),
    "how earthquakes happen": (
        "big pieces of the ground slowly push on each other until they suddenly slip",
        "stress accumulates at locked plate boundaries until elastic rebound releases it as seismic waves",
    ),
    "what inflation is": (
        "prices slowly go up, so the same money buys a bit less each year",
        "inflation is a sustained rise in the general price level, often tracked by CPI",
    ),
}
QUESTION_FORMS = ("Explain {topic}.", "Can you tell me {topic}?", "I have always wondered {topic}.")
ANALOGIES = {
    "sports": ("like a goalkeeper choosing which shots to stop", "like a relay team passing the baton"),
    "music": ("like a choir where the high voices carry furthest", "like a drummer keeping the beat"),
    "cooking": ("like following a recipe one step at a time", "like dough rising in a warm oven"),
    "space": ("like a rocket steering between planets", "like a satellite circling the Earth"),
    "animals": ("like a squirrel storing nuts for winter", "like a flock of birds turning together"),
    "video games": ("like unlocking a new level in a game", "like saving your progress at a checkpoint"),
}
LEVEL_FRAME = {
    "child": "Imagine this: {core}.",
    "preteen": "Here is the idea: {core}.",
    "teen": "Basically, {core}; scientists have measured this carefully.",
    "young_adult": "In short, {core}.",
    "expert": "Formally, {core}, which follows from first principles.",
}
AXES = {"level": LEVELS, "analogy": INTERESTS, "format": FORMATS}
_FORMAT_PHRASE = {
    "steps": "step-by-step answers",
    "story": "explanations told as a story",
    "summary": "a quick summary",
}
_LEVEL_PHRASE = {
    "child": "a young child in primary school",
    "preteen": "a preteen in middle school",
    "teen": "a high-school teenager",
    "young_adult": "a young adult at university",
    "expert": "an expert with a graduate degree",
}


class Elix(TemplateDomain):
    name = "elix"
    axes = AXES

    def sample_traits(self, rng, split, heldout):
        first, second = rng.sample(INTERESTS, 2)
        return {
            "level": rng.choice(LEVELS),
            "interests": f"{first},{second}",
            "format": rng.choice(FORMATS),
        }

    def describe(self, traits, rng):
        a, b = traits["interests"].split(",")
        return (
            f"The user is {_LEVEL_PHRASE[traits['level']]}. They love {a} and {b}, "
            f"and prefer {_FORMAT_PHRASE[traits['format']]}."
        )

    def ideal(self, traits):
        return {
            "level": traits["level"],
            "analogy": traits["interests"].split(",")[0],
            "format": traits["format"],
        }

    def sample_question(self, rng):
        topic = rng.choice(sorted(TOPICS))
        return Question(rng.choice(QUESTION_FORMS).format(topic=topic), {"topic": topic})

    def compose(self, question, attrs, draws):
        plain, technical = TOPICS[question.slots["topic"]]
        core = plain if LEVELS.index(attrs["level"]) < 3 else technical
        body = LEVEL_FRAME[attrs["level"]].format(core=core)
        analogy = f"It is a bit {pick(ANALOGIES[attrs['analogy']], draws[0])}."
        if attrs["format"] == "steps":
            return f"1. {body} 2. {analogy} 3. That is the whole idea."
        if attrs["format"] == "story":
            return f"Once, someone asked me this. {analogy} {body}"
        return f"{body} {analogy}"

    def score(self, traits, attrs):
        # An unreadable level (a free generation's, read by `read_attrs`) counts as the farthest one.
        level = attrs["level"]
        distance = len(LEVELS) - 1 if level is None else abs(LEVELS.index(level) - LEVELS.index(traits["level"]))
        interest = attrs["analogy"] in traits["interests"].split(",")
        return -2.0 * distance + 1.5 * interest + 1.0 * (attrs["format"] == traits["format"])

    def read_attrs(self, text):
        markers = {
            "level": {lv: (frame.split("{core}")[0].strip(),) for lv, frame in LEVEL_FRAME.items()},
            "analogy": ANALOGIES,
            "format": {"steps": ("1.",), "story": ("Once, someone asked me this.",)},
        }
        return read_by_markers(text, markers, default={"format": "summary"})

    def trait_space(self):
        return [
            {"level": lv, "interests": f"{a},{b}", "format": fm}
            for lv in LEVELS
            for a, b in itertools.permutations(INTERESTS, 2)
            for fm in FORMATS
        ]

    def stated_traits(self, description, traits):
        loved = [i for i in INTERESTS if contains(description, i)]
        return {
            "level": phrase_stated(description, _LEVEL_PHRASE, traits["level"]),
            "interests": sorted(loved) == sorted(traits["interests"].split(",")),
            "format": phrase_stated(description, _FORMAT_PHRASE, traits["format"]),
        }
