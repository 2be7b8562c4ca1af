"""Bio-MoE: phasor bank + k-WTA spiking gains + liquid mixture of experts on load_digits."""
from .model import (ZONES, BioMoE, BioMoEConfig, BioRouter, KWTAAttention, LiquidExpert,
                    MeritBoard, PhasorBank, zone_config)
from .train import BioResult, BioTrainConfig, evaluate, neurogenesis_config, train_bio
from .workload import run_workload

__all__ = ["ZONES", "BioMoE", "BioMoEConfig", "BioRouter", "KWTAAttention", "LiquidExpert",
           "MeritBoard", "PhasorBank", "zone_config", "BioResult", "BioTrainConfig", "evaluate",
           "train_bio", "run_workload", "neurogenesis_config"]
