"""``python -m deltakit.eval.harness_cli ...``: lm-evaluation-harness's own command line, with the model type
``deltakit`` registered, for users who drive the harness directly::

    python -m deltakit.eval.harness_cli run --model deltakit --model_args base=BASE_DIR,delta=DELTA_DIR \\
        --tasks my_task --include_path TASKS_DIR --device cpu

(The harness's plain ``lm_eval`` command does not load third-party model types.)
"""

from __future__ import annotations

import deltakit.eval.harness  # noqa: F401  registers model type "deltakit"


def main() -> None:
    """Run lm-eval's command line (arguments from ``sys.argv``)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
