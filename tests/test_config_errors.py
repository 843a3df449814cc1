"""What ``train.config.load_config`` refuses, for both schemas (recognition and landmarks), and the words it uses."""
from __future__ import annotations

import re

import pytest

from conftest import ROOT
from train.config import ConfigError, load_config

#: The file each task's cases start from: the built-in recognition defaults, the shipped aligner config (whose
#: ``task: landmarks`` picks the schema).
CONFIG_FILES = {"recognition": None, "landmarks": ROOT / "train" / "configs" / "aligner_300w.yaml"}
SYNTHETIC = "data.format=synthetic"


@pytest.mark.parametrize("task, overrides, message", [
    ("recognition", ["optim.lrr=0.1"], "did you mean 'optim.lr'"),
    ("recognition", ["optim.momentum=fast"], "optim.momentum must be float"),
    ("recognition", ["data.sampler=pk", "data.batch_size=100", "data.list=x"], "pk_p × pk_k"),
    ("recognition", ["loss.distill={weight: 1}", "data.list=x"], "needs data.teacher"),
    ("recognition", [SYNTHETIC, "loss.sharded=false", "loss.sample_rate=0.5"], "loss.sample_rate < 1 needs the sharded head"),
    ("recognition", [SYNTHETIC, "loss.sharded=maybe"], "loss.sharded must be auto, true or false"),
    ("recognition", [SYNTHETIC, "loss.sharded=true", "loss.head=softmax"], "needs a margin head"),
    ("landmarks", ["optim.lrr=0.1"], "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    ("landmarks", ["augmentation.flip=0.5"], "unknown config key 'augmentation'"),
    ("landmarks", ["embedding_size=128"], "unknown config key 'embedding_size'"),
    ("landmarks", ["stacks=two"], "stacks must be int"),
    ("landmarks", ["augment.scale=0.9"], "augment.scale must be list"),
    ("landmarks", ["augment.flip=1.5"], "augment.flip is a probability"),
    ("landmarks", ["depth=6"], "heatmap_size [32, 32] must be divisible by 2**depth = 64"),
    ("landmarks", ["heatmap_size=[30, 30]"], "must be an integer multiple of heatmap size"),
    ("landmarks", ["data.train=[]"], "data.train must be a list of folder names"),
    ("landmarks", ["optim.lr=0"], "optim.lr must be > 0"),
    ("landmarks", ["task=pose"], "task must be one of"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_a_bad_config_is_refused_with_the_reason(task, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(CONFIG_FILES[task], overrides)

