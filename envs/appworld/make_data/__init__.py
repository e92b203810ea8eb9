"""Generate a small AppWorld dataset offline, in AppWorld's own on-disk format, with the real apps.

Runs INSIDE the AppWorld venv (it imports ``appworld``), as the top-level package ``make_data``
(``envs/appworld`` on the path: importing ``envs`` would need gymnasium, which that venv lacks);
eprl calls it through ``eprl appworld make-data --out DIR``, or directly::

    PYTHONPATH=envs/appworld .venv-appworld/bin/python -m make_data --out DIR [--seed 0] [--validate]

What it writes under ``DIR/data`` (the layout ``AppWorld(task_id)`` and
``appworld serve environment --root DIR`` read):

    base_dbs/<app>.db                 the apps' own schemas (``ModelCollection(create_db=True)``),
                                      the api_docs table from the package, and a generated world:
                                      people with accounts, phone contacts, Venmo friends and
                                      payments, text messages, a Spotify catalogue and playlists,
                                      Simple Note notes
    api_docs/standard/<app>.json      API docs built from the installed apps
    tasks/<scenario>_<n>/specs.json   instruction, supervisor, datetime, db_version
    tasks/<id>/dbs/<app>.jsonl        the task's SQL change log on top of base_dbs
                                      (its supervisor, account passwords, task-specific records)
    tasks/<id>/ground_truth/          metadata.json (difficulty, mode=full), required_apps.json,
                                      public_data.json, private_data.json, answer.json,
                                      test_data.json, evaluation.py (state- and answer-based
                                      tests), solution.py and compiled_solution.py
                                      (``def solution(apis, requester)``)
    datasets/{train,dev,test_normal,test_challenge}.txt
    eprl_generated.json               the marker: seed, scenarios, whether the run completed

Twelve scenarios (3 tasks each, task ids ``<scenario>_<n>`` as in AppWorld) over the supervisor,
phone, simple_note, spotify and venmo apps at difficulty 1, 2 and 3. Everything is drawn from
``random.Random(seed)`` and a seeded Faker under a frozen clock, so the same seed gives the
same files. ``--validate`` runs every reference solution through ``AppWorld`` in-process and
fails unless each one passes all of its tests.

Modules: ``world`` (the plan, pure Python), ``db`` (the plan into the apps' databases),
``scenarios`` (one module per family of tasks; their evaluations are the ``evaluate_*.py.txt``
files beside them), ``dataset`` (the run), ``validation`` and ``__main__`` (the command line).
"""

from .dataset import generate
from .validation import validate

__all__ = ["generate", "validate"]
