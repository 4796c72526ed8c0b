"""Train a recipe: python launch.py --config=configs/resnet.py --workdir=runs/resnet"""

import os
import re
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
flags.DEFINE_string("compilation_cache_dir", None,
                    "Persistent cache of compiled steps (default: $JAX_COMPILATION_CACHE_DIR, else "
                    "~/.cache/hwrjax/jax); pass an empty value to turn it off.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from hwrjax import cli_support

    sys.exit(cli_support.run_training(FLAGS.config, FLAGS.workdir, FLAGS.allow_config_change,
                                      FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                      FLAGS.compilation_cache_dir))


def parse_flags(argv):
    """Parses flags, turning a bad --config.* override into one line naming the fix."""
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError) as e:
        text = str(e).replace("\\", "")
        names = re.findall(r"'(\w+)'", text)
        field = names[0] if names else text
        hint = re.search(r'Did you mean "(\w+)"', text)
        bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and field in a.split("=")[0]]
        sys.stderr.write(f"hwrjax: error: the config has no field {field!r} (from {', '.join(bad) or 'an override'}); "
                         f"{f'did you mean {hint.group(1)!r}? ' if hint else ''}"
                         "fix the --config.* name (every field is listed in configs/default.py)\n")
        sys.exit(2)
    except flags.Error as e:
        sys.stderr.write(f"hwrjax: error: {e}\n")
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
