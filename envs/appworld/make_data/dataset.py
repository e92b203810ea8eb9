"""Writing the dataset: base databases, API docs, one folder per task, the split files.

``generate`` is the whole run; the package docstring describes the layout it writes. It points
AppWorld at the output (``APPWORLD_ROOT`` and AppWorld's path store) before importing the rest of
AppWorld, so AppWorld is imported inside the functions, never at module level.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from textwrap import dedent
from typing import Any

from .db import add_texts, create_rows, write_world
from .scenarios import SCENARIOS, Scenario, TaskPlan, scenario_id
from .world import APPS_WITH_ACCOUNTS, WORLD_NOW, plan_world

SPLITS = ("train", "dev", "test_normal", "test_challenge")
GENERATOR = "envs/appworld/make_data"  # recorded in the marker file, so a reader finds this code
MARKER = "eprl_generated.json"  # under data/: says eprl wrote it (and may overwrite it)


def solution_code(body: str) -> str:
    """AppWorld's ground-truth form: one ``def solution(apis, requester)`` (``re`` is preloaded)."""
    lines = dedent(body).strip("\n").splitlines()
    return (
        "def solution(apis, requester):\n"
        + "\n".join("    " + line if line else "" for line in lines)
        + "\n"
    )


def write_task(
    data_dir: str, task_id: str, scenario: Scenario, plan: TaskPlan, base_models_path: str
) -> None:
    """One task folder: its database changes on top of ``base_dbs`` (the supervisor, their
    passwords and addresses, the task's own records), ``specs.json`` and ``ground_truth/``."""
    from appworld.apps import get_all_apps
    from appworld.collections.models import ModelCollection
    from appworld.common.constants import CANARY_STRING, DB_VERSION

    task_dir = os.path.join(data_dir, "tasks", task_id)
    os.makedirs(task_dir)
    person = plan.supervisor
    supervisor = {
        "first_name": person.first_name,
        "last_name": person.last_name,
        "email": person.email,
        "phone_number": person.phone_number,
    }
    apps = get_all_apps()
    models = ModelCollection.load(
        to_db_home_path=f":memory:task_input-{task_id}",
        from_db_home_path=base_models_path,
        load_apps=apps,
    )
    sup = models.supervisor.Supervisor.create_save(
        **supervisor, birthday=person.birthday, sex=person.sex
    )
    create_rows(
        models.supervisor.AccountPassword,
        [
            {"supervisor_id": sup.id, "account_name": app, "password": person.passwords[app]}
            for app in APPS_WITH_ACCOUNTS
        ],
    )
    create_rows(
        models.supervisor.Address,
        [
            {"supervisor_id": sup.id, "name": name, **address}
            for name, address in person.addresses.items()
        ],
    )
    models.supervisor.Task.create_save(supervisor_id=sup.id, instruction=plan.instruction)
    if plan.texts:
        add_texts(models, plan.texts)
    if plan.setup is not None:
        plan.setup(models)
    models.save(
        db_home_path=os.path.join(task_dir, "dbs"),
        format="changes",
        app_names=list(apps),
        delete_if_exists=True,
    )
    models.close()

    _write_json(
        os.path.join(task_dir, "specs.json"),
        {
            "instruction": plan.instruction,
            "supervisor": supervisor,
            "datetime": WORLD_NOW.isoformat(),
            "db_version": DB_VERSION,
            "canary_string": CANARY_STRING,
        },
    )
    code = solution_code(plan.solution_body)
    canary = f"# Canary String: {CANARY_STRING}\n"
    ground_truth = os.path.join(task_dir, "ground_truth")
    os.makedirs(ground_truth)
    files = {
        "metadata.json": json.dumps(
            {
                "difficulty": scenario.difficulty,
                "mode": "full",
                "scenario": scenario.name,
                "num_apps": len(scenario.required_apps),
                # set here so that AppWorld need not count them (it would need `black`)
                "num_solution_code_lines": sum(1 for line in code.splitlines()[1:] if line.strip()),
            },
            indent=2,
        ),
        "required_apps.json": json.dumps(scenario.required_apps),
        "public_data.json": json.dumps(plan.public_data, indent=2),
        "private_data.json": json.dumps(plan.private_data, indent=2),
        "answer.json": json.dumps(plan.answer),
        "test_data.json": json.dumps(
            [{"requirement": r, "label": label} for r, label in scenario.evaluation.tests], indent=2
        ),
        "evaluation.py": canary + scenario.evaluation.code,
        "solution.py": canary + code,
        "compiled_solution.py": canary + code,
    }
    for name, content in files.items():
        with open(os.path.join(ground_truth, name), "w") as handle:
            handle.write(content)


def _write_json(path: str, value: Any) -> None:
    with open(path, "w") as handle:
        json.dump(value, handle, indent=2)


def generate(out: str, seed: int = 0, tasks_per_scenario: int = 3) -> dict[str, list[str]]:
    """Write the dataset under ``out/data`` and return {split: task ids}."""
    out = os.path.abspath(out)
    os.environ["APPWORLD_ROOT"] = out
    from appworld.common.path_store import path_store

    path_store.update_root(out)
    from appworld.apps import get_all_apps
    from appworld.apps.api_lib import set_local_date_and_time, unset_local_date_and_time
    from appworld.collections.api_docs import ApiDocCollection
    from appworld.collections.models import ModelCollection
    from appworld.common.constants import CANARY_STRING

    data_dir = os.path.join(out, "data")
    marker = os.path.join(data_dir, MARKER)
    if os.path.isdir(data_dir) and os.listdir(data_dir) and not os.path.isfile(marker):
        raise SystemExit(
            f"refusing to overwrite {data_dir}: it exists and was not generated by eprl "
            "(real AppWorld data?); choose another --out"
        )
    shutil.rmtree(data_dir, ignore_errors=True)
    os.makedirs(data_dir)
    _write_json(marker, {"generator": GENERATOR, "seed": seed, "complete": False})
    freezer = set_local_date_and_time(WORLD_NOW)
    try:
        world = plan_world(seed)
        api_docs = ApiDocCollection.build(load_apps=tuple(get_all_apps(skip_admin=True)))
        standard = os.path.join(data_dir, "api_docs", "standard")
        os.makedirs(standard)
        for app_name, docs in api_docs.items():
            _write_json(
                os.path.join(standard, app_name + ".json"),
                {api: {**dict(doc), "canary_string": CANARY_STRING} for api, doc in docs.items()},
            )

        base = os.path.join(data_dir, "base_dbs")
        models = ModelCollection.load(
            to_db_home_path=":memory:base",
            from_db_home_path=":memory:base",
            load_apps=get_all_apps(),
            create_db=True,
        )
        write_world(models, world, api_docs)
        models.save(db_home_path=base, format="full", delete_if_exists=True)
        models.close()

        rng = random.Random(seed + 1)
        splits: dict[str, list[str]] = {split: [] for split in SPLITS}
        for scenario in SCENARIOS:
            used: set[int] = set()
            for n in range(1, tasks_per_scenario + 1):
                task_id = f"{scenario_id(seed, scenario.name)}_{n}"
                plan = scenario.make(world, rng, n, used)
                write_task(data_dir, task_id, scenario, plan, base)
                splits[scenario.split].append(task_id)
        os.makedirs(os.path.join(data_dir, "datasets"))
        for split, task_ids in splits.items():
            with open(os.path.join(data_dir, "datasets", split + ".txt"), "w") as handle:
                handle.write("".join(task_id + "\n" for task_id in task_ids))
        _write_json(
            marker,
            {
                "generator": GENERATOR,
                "seed": seed,
                "complete": True,
                "scenarios": {
                    scenario_id(seed, s.name): {
                        "name": s.name,
                        "difficulty": s.difficulty,
                        "apps": s.required_apps,
                        "split": s.split,
                    }
                    for s in SCENARIOS
                },
            },
        )
    finally:
        unset_local_date_and_time(freezer)
    return splits
