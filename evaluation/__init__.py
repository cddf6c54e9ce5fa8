"""Evaluation: benchmark adapters (native release formats), official scorers, the generation runner,
the prediction cache and the report. Importing the package registers every built-in benchmark."""
from evaluation.benchmark import BENCHMARKS, Benchmark, DataError, MissingData, Result, Sample, Score  # noqa: F401
from evaluation import ai2d, mathvista, mmmu, mmstar, mmvet, ocrbench  # noqa: F401  (image benchmarks)
from evaluation import demo, speech, video  # noqa: F401  (demo, speech and video benchmarks, issue 12)
