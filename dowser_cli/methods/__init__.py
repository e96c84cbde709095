"""Registries of interchangeable methods (mask strategies, fine-tuning methods, post-hoc merge
baselines), so that baselines are peers of dowser rather than branches of an if/elif chain. The
registries live in methods.registry; importing this package registers the built-in mask strategies and
merge baselines."""
from dowser_cli.methods import masks as _masks  # noqa: F401  (registers the built-in strategies)
from dowser_cli.methods import merges as _merges  # noqa: F401  (registers the merge baselines)
from dowser_cli.methods.registry import (FINETUNE_METHODS, MASK_STRATEGIES, MERGE_METHODS, FinetuneMethod,  # noqa: F401
                                         MaskStrategy, MergeMethod, Registry)
