"""The pipeline's stages, each declared once (`stage.py`), in the order `iipad run` runs them."""

from iipad_cli.pipeline.bank import BANK
from iipad_cli.pipeline.extract import EXTRACT
from iipad_cli.pipeline.metrics import METRICS
from iipad_cli.pipeline.score import SCORE
from iipad_cli.pipeline.stage import Stage
from iipad_cli.pipeline.train import TRAIN

STAGES: tuple[Stage, ...] = (EXTRACT, TRAIN, BANK, SCORE, METRICS)
