"""Command line of the data side: `python flows.py build|audit|serve|publish|doctor|gallery ...`.

A thin entry point: the commands and the Prefect flows live in pipeline.orchestrate (`python flows.py --help`).
No module of the project imports this file.
"""
import sys

from pipeline.orchestrate import build_flow, main  # noqa: F401  (build_flow: the flow a deployment runs)

if __name__ == "__main__":
    sys.exit(main())
