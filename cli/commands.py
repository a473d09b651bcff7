"""The list of `fspo-engine` subcommands, one module each."""

from fspo_engine.cli.bench import bench
from fspo_engine.cli.eval import eval_cmd
from fspo_engine.cli.gen_data import gen_data
from fspo_engine.cli.generate import generate
from fspo_engine.cli.model_info import model_info
from fspo_engine.cli.quickstart import quickstart
from fspo_engine.cli.score import score
from fspo_engine.cli.study import study
from fspo_engine.cli.train import train

ALL = [model_info, gen_data, train, score, eval_cmd, generate, study, bench, quickstart]
