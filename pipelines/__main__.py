"""``python -m pipelines`` == ``diffusion-pipeline``."""

from pipelines.cli import main

main()
