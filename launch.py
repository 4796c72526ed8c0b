"""Train a recipe: python launch.py --config=configs/resnet.py --workdir=runs/resnet"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # so configs/ imports `configs.default`

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/resnet.py or configs/resnet.py:smoke.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the report; reused to resume.")
flags.DEFINE_bool("allow_config_change", False, "Resume a workdir even though the config differs from the saved one.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "Index of this process in a multi-process run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from hwrjax import cli_support

    sys.exit(cli_support.run_training(FLAGS.config, FLAGS.workdir, FLAGS.allow_config_change,
                                      FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id))


if __name__ == "__main__":
    app.run(main)
