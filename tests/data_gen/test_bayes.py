"""The template generator read backwards: responses back into attributes, descriptions back into traits,
and the Bayes (population-prior) few-shot reference, checked against an exact brute force and against the generator."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from fractions import Fraction

import pytest

from fspo_engine.data_gen.bayes import BayesModel, models_for
from fspo_engine.data_gen.domains import DOMAIN_NAMES, PRESETS, get_domain
from fspo_engine.data_gen.domains.base import N_DRAWS

ALL_DOMAINS = [(name, None) for name in DOMAIN_NAMES] + [(PRESETS[p].name, p) for p in PRESETS]


@pytest.mark.parametrize("name,preset", ALL_DOMAINS)
def test_read_attrs_inverts_compose(name, preset):
    domain = get_domain(name, preset)
    rng = random.Random(0)
    for _ in range(300):
        question = domain.sample_question(rng)
        attrs = rng.choice(domain.attribute_space())
        text = domain.compose(question, attrs, [rng.getrandbits(30) for _ in range(N_DRAWS)])
        assert domain.read_attrs(text) == attrs, text


@pytest.mark.parametrize("name,preset", ALL_DOMAINS)
def test_read_attrs_leaves_unreadable_and_mixed_axes_unknown(name, preset):
    domain = get_domain(name, preset)
    got = domain.read_attrs("zzz qqq")
    assert set(got) == set(domain.axes)
    # An axis without a default value (concise = no verbose clause; summary = neither steps nor story)
    # is unknown when no marker is present.
    assert sum(v is None for v in got.values()) >= len(domain.axes) - 1
    rng = random.Random(1)
    q = domain.sample_question(rng)
    draws = [rng.getrandbits(30) for _ in range(N_DRAWS)]
    base = {axis: values[0] for axis, values in domain.axes.items()}
    other = {axis: values[1] for axis, values in domain.axes.items()}
    mixed = domain.read_attrs(domain.compose(q, base, draws) + " " + domain.compose(q, other, draws))
    assert any(v is None for v in mixed.values())  # contradictory markers are not resolved by guessing


@pytest.mark.parametrize("name,preset", ALL_DOMAINS)
def test_stated_traits_reads_descriptions(name, preset):
    domain = get_domain(name, preset)
    rng = random.Random(2)
    for _ in range(50):
        traits = domain.sample_traits(rng, "train", frozenset())
        desc = domain.describe(traits, rng)
        assert all(domain.stated_traits(desc, traits).values()), desc
        other = domain.sample_traits(rng, "train", frozenset())
        stated = domain.stated_traits(domain.describe(other, rng), traits)
        for trait, ok in stated.items():
            # Descriptions word only the two axes a reviewer puts first of their priority order, and a
            # user's two interests in either order.
            norm = {"priority": lambda v: v.split(",")[:2], "interests": lambda v: sorted(v.split(","))}.get(
                trait, lambda v: v)
            if norm(other[trait]) != norm(traits[trait]):
                assert not ok, (trait, other[trait], traits[trait])
    assert not any(domain.stated_traits("", traits).values())


# --- an exact brute force, written from make_pair's steps (Fractions, no numpy, no BayesModel) ------------
def _brute_pair_probs(domain, traits, noise):
    """P(chosen attrs, rejected attrs | traits) of one make_pair call, exactly."""
    names = sorted(domain.axes)
    kept, rejected_mass = Counter(), Fraction(0)
    if getattr(domain, "contrast_only", False):
        # Only the contrasted axes are mentioned: a k-subset, a uniform value on each, the other on b.
        for k in sorted(set(domain.changed_axes)):
            p_k = Fraction(domain.changed_axes.count(k), len(domain.changed_axes))
            subsets = list(itertools.combinations(names, k))
            for axes in subsets:
                # a uniform value on each contrasted axis for a, a uniform other one for b
                sides = [[(v, w) for v in domain.axes[n] for w in domain.axes[n] if w != v] for n in axes]
                for values in itertools.product(*sides):
                    p = p_k / len(subsets) / math.prod(len(s) for s in sides)
                    a = {n: dict(zip(axes, (v for v, _ in values))).get(n) for n in names}
                    b = {n: dict(zip(axes, (w for _, w in values))).get(n) for n in names}
                    sa, sb = domain.score(traits, a), domain.score(traits, b)
                    if sa == sb:
                        rejected_mass += p
                        continue
                    good, bad = (a, b) if sa > sb else (b, a)
                    key = lambda x: tuple(x[n] for n in names)
                    kept[key(good), key(bad)] += p * (1 - noise)
                    kept[key(bad), key(good)] += p * noise
        return {pair: p / (1 - rejected_mass) for pair, p in kept.items()}
    if domain.minimal_pairs:
        starts = [(Fraction(1), dict(domain.ideal(traits)))]
        sizes = [(Fraction(1), 1)]
    else:
        space = list(itertools.product(*(domain.axes[n] for n in names)))
        starts = [(Fraction(1, len(space)), dict(zip(names, v))) for v in space]
        draws = [min(k, len(names)) for k in domain.changed_axes]
        sizes = [(Fraction(draws.count(k), len(draws)), k) for k in sorted(set(draws))]
    for p_a, a in starts:
        for p_k, k in sizes:
            subsets = list(itertools.combinations(names, k))
            for axes in subsets:
                choices = [[v for v in domain.axes[n] if v != a[n]] for n in axes]
                for new in itertools.product(*choices):
                    p = p_a * p_k / len(subsets) / len(list(itertools.product(*choices)))
                    b = {**a, **dict(zip(axes, new))}
                    sa, sb = domain.score(traits, a), domain.score(traits, b)
                    if sa == sb:
                        rejected_mass += p
                        continue
                    good, bad = (a, b) if sa > sb else (b, a)
                    key = lambda x: tuple(x[n] for n in names)
                    kept[key(good), key(bad)] += p * (1 - noise)
                    kept[key(bad), key(good)] += p * noise
    return {pair: p / (1 - rejected_mass) for pair, p in kept.items()}


def _brute_p_chosen(domain, noise, shots, target, cache=None):
    names = sorted(domain.axes)
    key = lambda text: tuple(domain.read_attrs(text)[n] for n in names)
    num = den = Fraction(0)
    cache = {} if cache is None else cache  # trait vector -> its pair probabilities (they depend on nothing else)
    for traits in domain.trait_space():
        tkey = tuple(sorted(traits.items()))
        if tkey not in cache:
            cache[tkey] = _brute_pair_probs(domain, traits, noise)
        probs = cache[tkey]
        like = Fraction(1)
        for c, r in shots:
            like *= probs.get((key(c), key(r)), Fraction(0))
        x, y = key(target[0]), key(target[1])
        num += like * probs.get((x, y), Fraction(0))
        den += like * (probs.get((x, y), Fraction(0)) + probs.get((y, x), Fraction(0)))
    return num / den


def _user_pairs(domain, traits, n, noise, seed):
    rng = random.Random(seed)
    return [domain.make_pair(traits, rng, noise) for _ in range(n)]


@pytest.mark.parametrize("preset,noise", [("quickstart", Fraction(0)), ("quickstart", Fraction(1, 10)),
                                          ("quickstart-easy", Fraction(1, 20))])
def test_bayes_model_equals_brute_force_over_all_trait_vectors(preset, noise):
    domain = get_domain("reviews", preset)
    model = BayesModel(domain, float(noise))
    rng = random.Random(3)
    checked = 0
    cache = {}
    for trial in range(12):
        traits = rng.choice(domain.trait_space())
        pairs = _user_pairs(domain, traits, 1 + trial % 6, float(noise), seed=trial)
        shots = [(p.chosen, p.rejected) for p in pairs[:-1]]
        target = (pairs[-1].chosen, pairs[-1].rejected)
        exact = _brute_p_chosen(domain, noise, shots, target, cache)
        assert model.p_chosen(shots, target) == pytest.approx(float(exact), abs=1e-12)
        checked += exact not in (0, 1, Fraction(1, 2))
    if noise:
        assert checked  # some episodes are genuinely uncertain, not only the 0 / 1/2 / 1 cases


def test_bayes_model_matches_the_real_generator():
    """The model's P(chosen, rejected | traits) against make_pair's own frequencies."""
    domain = get_domain("reviews", "quickstart")
    noise = 0.1
    model = BayesModel(domain, noise)
    n = 8000
    for ti in (0, 13):
        traits = domain.trait_space()[ti]
        rng = random.Random(ti)
        counts = Counter()
        for _ in range(n):
            p = domain.make_pair(traits, rng, noise)
            counts[model.attr_index(p.chosen), model.attr_index(p.rejected)] += 1
        for (c, r), k in counts.items():
            seen, first = model._pair(c, r)
            expected = seen[ti] * first[ti]
            sd = (expected * (1 - expected) / n) ** 0.5
            assert abs(k / n - expected) < 5 * sd + 1e-9, (c, r, k / n, expected)
        assert sum(counts.values()) == n


def test_models_for_reads_the_manifest():
    manifest = {"domains": ["reviews"], "generator": {"backend": "template", "preset": "quickstart",
                                                      "label_noise": 0.0}}
    (model,) = models_for(manifest).values()
    assert isinstance(model.domain, type(get_domain("reviews", "quickstart")))
    assert models_for({"domains": ["reviews"], "generator": {"backend": "openai"}}) == {}
    assert models_for({}) == {}
    with pytest.raises(ValueError, match="impossible"):  # it mentions no trait: no pair of the generator's
        model.p_chosen([], ("an imported, free-text response", "another one"))
    (full,) = models_for({"domains": ["reviews"], "generator": {"backend": "template"}}).values()
    with pytest.raises(ValueError, match="not a response"):
        full.attr_index("an imported, free-text response")


def test_a_training_users_prior_that_lacks_the_users_combination_points_away_from_it():
    """The training-prior predictor (evaluate's `training_prior_accuracy`): with every trait vector in the
    prior it is the uniform predictor; without the user's own combination, shots that reveal all but one of
    the user's traits make it name the *other* value of the last one (the only combination left), where the
    uniform predictor is at a coin flip; add-0.1 smoothing (evaluate's) keeps the user's combination possible
    but unlikely; a prior that rules out all the shots allow is an error, not a silent 1/2."""
    domain = get_domain("reviews", "quickstart")
    model = BayesModel(domain, 0.0)
    names = sorted(domain.axes)
    rng = random.Random(5)
    everyone = model.prior_of(domain.trait_space())
    for trial in range(10):
        traits = rng.choice(domain.trait_space())
        pairs = _user_pairs(domain, traits, 4, 0.0, seed=100 + trial)
        shots, target = [(p.chosen, p.rejected) for p in pairs[:-1]], (pairs[-1].chosen, pairs[-1].rejected)
        assert model.p_chosen(shots, target, prior=everyone) == pytest.approx(model.p_chosen(shots, target))
    user = {n: domain.axes[n][0] for n in names}
    q = domain.sample_question(rng)
    say = lambda attrs: domain.compose(q, {n: attrs.get(n) for n in names}, [0] * N_DRAWS)
    other = lambda n: domain.axes[n][1]
    # One shot per trait but the last: chosen carries the user's value, rejected the other.
    shots = [(say({n: user[n]}), say({n: other(n)})) for n in names[:-1]]
    last = names[-1]
    target = (say({last: user[last]}), say({last: other(last)}))
    assert model.p_chosen(shots, target) == 0.5
    without_user = model.prior_of([t for t in domain.trait_space() if t != user])
    assert model.p_chosen(shots, target, prior=without_user) == 0.0
    smoothed = model.p_chosen(shots, target, prior=without_user + 0.1)
    assert 0.0 < smoothed < 0.5
    only_far = model.prior_of([{n: other(n) for n in names}])
    with pytest.raises(ValueError, match="impossible"):
        model.p_chosen(shots, target, prior=only_far)
    assert model.p_chosen(shots, target, prior=only_far + 0.1) == pytest.approx(0.5)  # smoothing alone: uniform
    with pytest.raises(ValueError, match="trait space"):
        model.prior_of([{"sentiment": "lukewarm"}])


def test_random_labels_make_every_label_a_coin_for_the_reference(tmp_path):
    from fspo_engine.data_gen import generate_dataset
    from fspo_engine.data_gen.bayes import models_for

    result = generate_dataset(tmp_path / "r", preset="quickstart", users=40, progress=False, ablation="random-labels")
    model = models_for(result.manifest)["reviews"]
    assert model.noise == 0.5
    # Whatever the shots say, the reference is a coin: labels carry nothing about the user.
    import json

    prefs = [json.loads(line) for line in (tmp_path / "r" / "prefs.jsonl").read_text().splitlines()]
    shots = [(p["chosen"], p["rejected"]) for p in prefs[:8]]
    assert model.p_chosen(shots, (prefs[8]["chosen"], prefs[8]["rejected"])) == pytest.approx(0.5)
