"""``python -m data_pipelines.metaworld``: Meta-World expert demos as RLDS (see ``dataset``)."""

from data_pipelines.metaworld.dataset import cli

if __name__ == "__main__":
    cli()
