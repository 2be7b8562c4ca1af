"""Semantic MoE (ASTRA-X design): MeaningSpace + FAISS teacher router + distilled student."""
from .model import PRESETS, MoEFFN, SemanticMoEConfig, SemanticMoELM
from .router import SemanticRouter, spherical_kmeans
from .train import TrainingConfig, TrainMetrics, evaluate, train
from .workload import run_workload

__all__ = ["PRESETS", "MoEFFN", "SemanticMoEConfig", "SemanticMoELM", "SemanticRouter",
           "spherical_kmeans", "TrainingConfig", "TrainMetrics", "evaluate", "train", "run_workload"]
