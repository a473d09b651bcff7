"""The Bayes predictor of a template dataset's labels from exactly the shots a model sees: the reference curve
for few-shot preference accuracy.

Under the population prior below it is the best possible predictor for a user drawn from the whole
population; it is not a ceiling on a given split. Test users hold trait combinations that training users
lack, so a predictor told which ones (the split's own prior) could do better, and a finite sample of
episodes can land above or below its expectation.

The template generator's model of its data is known in closed form (domains/base.py `make_pair`):
- a user is a trait vector t, uniform over `domain.trait_space()`. This is the population prior: the
  predictor knows how users are made but not which trait combinations were held out for test users (a
  predictor told that would be reading the split, not the shots);
- a pair is drawn as (a, b): a uniform attribute vector a, then k axes (k uniform over
  `domain.changed_axes`, the axes a uniform k-subset) each moved to a uniformly drawn other value
  (minimal-pair domains start from the user's ideal vector and move one axis). Pairs the user scores
  equally are redrawn, so which pairs a user gets also says something about the user;
- the side the user scores higher is chosen; with probability `label_noise` the two are then swapped.

A shot (chosen c, rejected r), read back from its texts by `domain.read_attrs`, has likelihood
P({c, r} | t) · P(c chosen | t, {c, r}). The posterior over t is the prior times the shots' likelihoods;
for the target pair {x, y}, p = P(x chosen | shots, {x, y}) sums the posterior over t. The best predictor
names the likelier side, so its accuracy on the episode is max(p, 1 - p) in expectation; on the data's own
label it is right when it names the chosen side. Everything is enumerated exactly (numpy float64).
"""

from __future__ import annotations

import functools

import numpy as np

from fspo_engine.data_gen.domains import TemplateDomain, get_domain


class BayesModel:
    """The generator's model of one domain's data; `p_chosen` is the posterior choice on one episode."""

    def __init__(self, domain: TemplateDomain, label_noise: float):
        if not 0.0 <= label_noise <= 0.5:  # 0.5: labels are coins (the random-labels ablation)
            raise ValueError(f"label_noise must be in [0, 0.5], got {label_noise}")
        self.domain = domain
        self.noise = label_noise
        self.names = sorted(domain.axes)
        self.traits = domain.trait_space()
        self.attrs = domain.attribute_space()
        self.index = {tuple(a[n] for n in self.names): i for i, a in enumerate(self.attrs)}
        self.scores = np.array([[domain.score(t, a) for a in self.attrs] for t in self.traits])  # (T, A)
        self.proposal = self._proposal()
        self.accept = np.zeros(len(self.traits))  # (T,): P(a draw is kept), the redraw normaliser
        for (i, j), q in self.proposal.items():
            self.accept += q * (self.scores[:, i] != self.scores[:, j])

    def _proposal(self) -> dict[tuple[int, int], np.ndarray]:
        """{(a, b): P(draw a then b) per trait vector, (T,)} of one `make_pair` draw before tied pairs are
        redrawn (`domain.pair_proposal`). Sparse: a domain proposes few of the A² attribute pairs (a preset
        whose responses mention only contrasted axes has 3^8 attribute vectors at 8 traits, but a few hundred
        pairs), so the model stays small where a dense (T, A, A) table would not fit in memory."""
        out: dict[tuple[int, int], np.ndarray] = {}
        per_trait = self.domain.proposal_uses_traits
        for ti, traits in enumerate(self.traits if per_trait else [None]):
            for a, b, p in self.domain.pair_proposal(traits):
                q = out.setdefault((self._key(a), self._key(b)), np.zeros(len(self.traits)))
                if per_trait:
                    q[ti] += p
                else:
                    q += p
        return out

    def _key(self, attrs: dict) -> int:
        return self.index[tuple(attrs.get(n) for n in self.names)]

    def attr_index(self, text: str) -> int:
        """The attribute vector a generated response carries; ValueError if the text is not one."""
        attrs = self.domain.read_attrs(text)
        key = tuple(attrs.get(n) for n in self.names)
        if key not in self.index:
            raise ValueError(f"not a response of the {self.domain.name} template generator: {text!r}")
        return self.index[key]

    @functools.cache  # noqa: B019 - one model per evaluation; pairs repeat across episodes
    def _pair(self, i: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(P({i, j} | t), P(i chosen | t, {i, j})), each (T,)."""
        zero = np.zeros(len(self.traits))
        q = self.proposal.get((i, j), zero) + self.proposal.get((j, i), zero)
        si, sj = self.scores[:, i], self.scores[:, j]
        seen = np.where(si != sj, q / self.accept, 0.0)
        first = np.where(si > sj, 1.0 - self.noise, self.noise)
        return seen, first

    def prior_of(self, users_traits) -> np.ndarray:
        """Counts over `self.traits` of how many of the given users (trait dicts) hold each trait vector: the
        training users' prior (unnormalised), which lacks the combinations held out for test users. Add a
        pseudo-count (engine/evaluate.py: 0.1) before `p_chosen`, or those combinations are impossible."""
        key = lambda t: tuple(sorted((k, str(v)) for k, v in t.items()))
        index = {key(t): i for i, t in enumerate(self.traits)}
        prior = np.zeros(len(self.traits))
        for t in users_traits:
            i = index.get(key(t))
            if i is None:
                raise ValueError(f"traits {t} are not in the {self.domain.name} generator's trait space")
            prior[i] += 1.0
        return prior

    def p_chosen(self, shots: list[tuple[str, str]], target: tuple[str, str],
                 prior: np.ndarray | None = None) -> float:
        """P(target[0] is the chosen side | the shots' (chosen, rejected) texts, the target pair's texts),
        under the uniform population prior or the given one (`prior_of`, smoothed). ValueError when the prior
        rules out everything the shots allow."""
        post = np.ones(len(self.traits)) if prior is None else np.asarray(prior, dtype=float).copy()
        for chosen, rejected in shots:
            seen, first = self._pair(self.attr_index(chosen), self.attr_index(rejected))
            post = post * seen * first
        seen, first = self._pair(self.attr_index(target[0]), self.attr_index(target[1]))
        weight = post * seen
        total = weight.sum()
        if total <= 0:
            raise ValueError("the shots and target are impossible under the generator's model"
                             + ("" if prior is None else " and this prior"))
        return float((weight * first).sum() / total)


def models_for(manifest: dict) -> dict[str, BayesModel]:
    """A BayesModel per domain of a template-generated dataset (from its manifest); {} for any other."""
    gen = manifest.get("generator") if isinstance(manifest.get("generator"), dict) else {}
    if gen.get("backend") != "template":
        return {}
    noise = float(gen.get("label_noise") or 0.0)
    if gen.get("ablation") == "random-labels":
        noise = 0.5  # each label a fair coin whatever the user: the posterior never moves, the reference is 0.5
    domains = manifest.get("domains") or gen.get("domains") or []
    return {name: BayesModel(get_domain(name, gen.get("preset")), noise) for name in domains}


__all__ = ["BayesModel", "models_for"]
