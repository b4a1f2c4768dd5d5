"""``python -m experiments.metaworld``: closed-loop Meta-World evaluation (see ``evaluation``)."""

from experiments.metaworld.evaluation import run_cli

if __name__ == "__main__":
    run_cli()
