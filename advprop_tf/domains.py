"""What each BN domain is, decided once here and handed to the model builder, the methods and the input pipeline.

A network's BN domains are a tuple of names, the first the MAIN one (kept for
inference). An auxiliary domain is either
  * adversarial: the PGD copy of the clean images, made through its own BN.
    "adv" attacks with the configured (or scheduled) epsilon; "adv<eps>"
    (adv1, adv2, adv0.5) with its own, for fine-grained AdvProp as several BNs;
  * an input view: the same images with another augmentation (randaugment,
    autoaugment), which the input pipeline provides under the domain's name;
  * generated: images a training method makes itself (its registry record
    names them, e.g. a Gaussian-noise copy).
Nothing else in the package parses domain names or spells the main one.
"""

from __future__ import annotations

import dataclasses

MAIN = "clean"
ADVERSARIAL_PREFIX = "adv"
DEFAULT_DOMAINS = (MAIN, ADVERSARIAL_PREFIX)
# The input views an auxiliary domain can be (augmentations of the clean images, data/pipeline.py).
VIEWS = ("randaugment", "autoaugment")
# Measures on unperturbed images carry this name in evaluation results, as the images themselves do in
# the input pipeline's dict of views: they are the main domain's images.
CLEAN_IMAGES = MAIN


@dataclasses.dataclass(frozen=True)
class Domain:
    name: str
    kind: str  # "main", "adversarial", "view" or "generated"
    epsilon: float | None = None  # adversarial: its own epsilon (adv2), or None for the attack's

    @property
    def adversarial(self) -> bool:
        return self.kind == "adversarial"


def parse_domain(name: str, main: bool = False) -> Domain:
    """The Domain a name stands for; ValueError saying why a name is none."""
    if main:
        return Domain(name, "main")
    if name.startswith(ADVERSARIAL_PREFIX):
        suffix = name[len(ADVERSARIAL_PREFIX):]
        if not suffix:
            return Domain(name, "adversarial")
        try:
            epsilon = float(suffix)
        except ValueError:
            raise ValueError(f"adversarial domain {name!r}: after {ADVERSARIAL_PREFIX!r} comes an epsilon in pixels, "
                             "e.g. adv2 or adv0.5") from None
        if not 0 < epsilon < float("inf"):
            raise ValueError(f"adversarial domain {name!r}: its epsilon must be a positive number")
        return Domain(name, "adversarial", epsilon)
    if name in VIEWS:
        return Domain(name, "view")
    raise ValueError(f"{name!r} is neither adversarial ({ADVERSARIAL_PREFIX}...) nor an input view ({', '.join(VIEWS)})")


@dataclasses.dataclass(frozen=True)
class DomainSpec:
    """A network's domains, main first."""

    domains: tuple

    @classmethod
    def of(cls, names, generated=()) -> "DomainSpec":
        """From a tuple of names (a model's `domains`), main first; `generated`: the names a method makes the
        images of. ValueError on a bad or repeated name."""
        names = tuple(names)
        if not names:
            raise ValueError("a network needs at least its main domain")
        if len(set(names)) != len(names):
            raise ValueError(f"domain names must be unique, got {','.join(names)}")
        if MAIN in names[1:]:
            raise ValueError(f"{MAIN!r} is the main domain; it cannot be an auxiliary one")
        return cls((parse_domain(names[0], main=True),) + tuple(
            Domain(n, "generated") if n in generated else parse_domain(n) for n in names[1:]))

    @classmethod
    def main_only(cls) -> "DomainSpec":
        return cls((Domain(MAIN, "main"),))

    @classmethod
    def with_auxiliary(cls, auxiliary, generated=()) -> "DomainSpec":
        return cls.of((MAIN,) + tuple(auxiliary) + tuple(generated), generated)

    @property
    def names(self) -> tuple:
        return tuple(d.name for d in self.domains)

    @property
    def main(self) -> str:
        return self.domains[0].name

    @property
    def adversarial(self) -> tuple:
        """The adversarial domains' names, in order (the k-th gets the k-th attack seed)."""
        return tuple(d.name for d in self.domains if d.adversarial)

    @property
    def views(self) -> tuple:
        """The input views the pipeline must provide."""
        return tuple(d.name for d in self.domains if d.kind == "view")

    def get(self, name: str) -> Domain:
        for domain in self.domains:
            if domain.name == name:
                return domain
        raise ValueError(f"unknown BN domain {name!r}; the network has {', '.join(self.names)}")
