"""Evaluate sealed AppWorld episodes from their saved state (AppWorld venv only; see sealed.py).

``sealed.py`` runs this with the AppWorld venv's python in a bubblewrap sandbox that holds the
full data, ground truth included, read-only, and a read-only inbox of saved episode states. It
never runs model code: it loads the database state an episode's server saved after its last
cell and runs the task's tests against it (``appworld.evaluator.evaluate_task``).

    python evaluate.py --root ROOT

One JSON request per line on stdin, ``{"task_id": ..., "experiment_name": ...}``; one JSON reply
per line on the original stdout, ``{"output": <TestTracker.to_dict(stats_only=False)>}`` or
``{"error": "<traceback>"}``. Anything AppWorld prints goes to stderr, not into the protocol.
"""

import argparse
import json
import os
import sys
import traceback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="AppWorld root: data/ and experiments/")
    args = parser.parse_args()
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    from appworld import update_root

    update_root(args.root)
    from appworld.apps.model_lib import CachedDBHandler
    from appworld.evaluator import evaluate_task

    replies.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        try:
            tracker = evaluate_task(
                task_id=request["task_id"],
                experiment_name=request["experiment_name"],
                suppress_errors=True,
                save_report=False,
            )
            reply = {"output": tracker.to_dict(stats_only=False)}
        except Exception:  # noqa: BLE001 (the host turns it into an error naming the episode)
            reply = {"error": traceback.format_exc()[-3000:]}
        finally:
            CachedDBHandler.reset()
        replies.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
