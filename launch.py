"""Train a recipe: python launch.py --config=configs/resnet.py --workdir=runs/resnet

Exit status: 0 trained and reported, or stopped by SIGTERM / Ctrl-C after saving a checkpoint
(rerun the same command to resume); 2 a one-line error (bad flags or config, a workdir in use
by another run, damaged files, a full disk); 3 training diverged (a non-finite loss or gradient
norm; the last finite checkpoint stays the newest: rerun with a lower learning rate and
--allow_config_change to resume from it).
"""

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
    from hwrjax.cli import training as training_cli

    sys.exit(training_cli.run_training(FLAGS.config, FLAGS.workdir, FLAGS.allow_config_change,
                                       FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                       FLAGS.compilation_cache_dir))


def _last_line(e: Exception) -> str:
    """The last non-empty line of an error's text (config_flags puts a traceback before it)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[-1] if lines else type(e).__name__
    return re.sub(r"^\w+(Error|Exception): ", "", text)


def parse_flags(argv):
    """Parses flags and loads the recipe, turning a bad --config or --config.* override into one line."""
    try:
        rest = FLAGS(argv)
        FLAGS.config.keys()  # a recipe file that failed to load raises here, not in the middle of the run
        return rest
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
        text = str(e)
        if "\n" in text:  # a recipe's own error, after config_flags' traceback
            given = next((a for a in argv[1:] if a.startswith("--config=")), "--config")
            text = f"{given}: {_last_line(e)}"
        sys.stderr.write(f"hwrjax: error: {text}\n")
        sys.exit(2)
    except (OSError, ValueError, TypeError, SyntaxError, ImportError) as e:  # the recipe file cannot be loaded
        given = next((a for a in argv[1:] if a.startswith("--config=")), "--config")
        sys.stderr.write(f"hwrjax: error: cannot load {given} ({_last_line(e)}); pass a recipe file such as "
                         "--config=configs/resnet.py or configs/resnet.py:smoke\n")
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
