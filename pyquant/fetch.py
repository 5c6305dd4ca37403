"""`pyquant fetch [MODEL ...]`: put the real models into the cache (see pyquant.models)."""

from .models import ALIASES, MODELS, model_path


def add_arguments(p):
    p.add_argument("models", nargs="*", default=sorted(MODELS), help=f"any of {', '.join(sorted(MODELS) + sorted(ALIASES))}")


def run(args) -> int:
    for name in args.models:
        print(model_path(name))
    return 0
