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
import datetime
import gc
import json
import os
import sys
import traceback


def warm_up() -> None:
    """Do before the ready line the first-use work of ``evaluate_task`` that no task decides
    (~1.5 CPU-seconds, else paid by the first episode's reward): import every app's models,
    load the API docs (``Task.load`` caches them for all apps, whatever the task) and fill
    freezegun's cache of module attributes (its first ``start()`` walks every module)."""
    from appworld.apps import get_all_apps
    from appworld.apps.api_lib import set_local_date_and_time, unset_local_date_and_time
    from appworld.collections.api_docs import ApiDocCollection
    from appworld.common.utils import import_models_module

    for app_name in get_all_apps():
        import_models_module(app_name)
    ApiDocCollection.load(
        load_apps=tuple(get_all_apps(skip_admin=True)), include_response_schemas=True
    )
    unset_local_date_and_time(set_local_date_and_time(datetime.datetime(2000, 1, 1)))


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

    warm_up()
    gc.collect()  # what is loaded now lives as long as the evaluator: out of the collector's way
    gc.freeze()
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
