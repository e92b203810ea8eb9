"""Simple Note edits: append a line to a named note and pin it."""

from __future__ import annotations

import random

from ..world import World
from .common import LOGIN, NO_OP_FAIL, NO_OP_PASS, TaskPlan, evaluation, pick, render

NOTE_APPEND = evaluation("note_append", (NO_OP_FAIL, NO_OP_PASS, NO_OP_FAIL, NO_OP_PASS))


def scenario_note_append(world: World, rng: random.Random, n: int, used: set[int]) -> TaskPlan:
    person = pick(
        rng,
        world,
        used,
        ok=lambda p: any(note["owner"] == p.index and not note["pinned"] for note in world.notes),
    )
    candidates = [
        (i, note)
        for i, note in enumerate(world.notes)
        if note["owner"] == person.index and not note["pinned"]
    ]
    note_index, note = rng.choice(candidates)
    line = rng.choice(
        (
            "Follow up next Monday.",
            "Ask Sam for the details.",
            "Double-check the budget.",
            "Remember the receipts.",
            "Share with the team.",
        )
    )
    body = LOGIN + render(
        """
    token = apis.simple_note.login(username=profile["email"], password=passwords["simple_note"])["access_token"]
    notes = apis.simple_note.search_notes(access_token=token, query=<<title>>, page_limit=20)
    note = next(n for n in notes if n["title"] == <<title>>)
    apis.simple_note.add_content_to_note(
        note_id=note["note_id"], append_or_prepend="append", added_content=<<line>>, access_token=token
    )
    apis.simple_note.update_note(note_id=note["note_id"], pinned=True, access_token=token)
    apis.supervisor.complete_task()
    """,
        title=note["title"],
        line=line,
    )
    return TaskPlan(
        person,
        f"In Simple Note, add the line '{line}' at the end of my note '{note['title']}' and pin that note.",
        body,
        private_data={"note_id": note_index + 1, "line": line, "original_content": note["content"]},
    )
