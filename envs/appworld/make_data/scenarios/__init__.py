"""The twelve scenarios, one row each, in generation order (the order is part of the data).

Each row: name (AppWorld-style, part of the scenario id), difficulty (1-3), the apps the task
needs besides the supervisor, its split, its evaluation and the function that plans its tasks.
One ``random.Random`` runs through the rows in this order, so reordering them (or adding a row
before others) changes every later task.
"""

from __future__ import annotations

import hashlib

from . import notes, payments, playlists, questions, texts
from .common import Scenario, TaskPlan

SCENARIOS = (
    # name            difficulty, apps, split, evaluation, task planner
    Scenario("address", 1, [], "train", questions.ANSWER, questions.scenario_address),
    Scenario("notetags", 1, ["simple_note"], "train", questions.ANSWER, questions.scenario_note_tag_count),
    Scenario("venmopay", 2, ["venmo"], "train", payments.VENMO_PAY, payments.scenario_venmo_pay),
    Scenario("noteappend", 2, ["simple_note"], "train", notes.NOTE_APPEND, notes.scenario_note_append),
    Scenario("payback", 3, ["phone", "venmo"], "train", payments.PAYBACK, payments.scenario_payback),
    Scenario("birthday", 1, ["phone"], "dev", questions.ANSWER, questions.scenario_contact_birthday),
    Scenario("playlistadd", 2, ["spotify"], "dev", playlists.PLAYLIST_ADD, playlists.scenario_playlist_add),
    Scenario("playlistcount", 1, ["spotify"], "test_normal", questions.ANSWER, questions.scenario_playlist_count),
    Scenario("textrelation", 2, ["phone"], "test_normal", texts.TEXT_MESSAGE, texts.scenario_text_relation),
    Scenario("notetoplaylist", 3, ["simple_note", "spotify"], "test_normal", playlists.NOTE_TO_PLAYLIST, playlists.scenario_note_to_playlist),
    Scenario("sentsince", 3, ["phone", "venmo"], "test_challenge", questions.ANSWER, questions.scenario_roommate_total),
    Scenario("texttopsong", 3, ["phone", "spotify"], "test_challenge", texts.TEXT_MESSAGE, texts.scenario_text_top_song),
)  # fmt: skip


def scenario_id(seed: int, name: str) -> str:
    """AppWorld-style 7-hex scenario id (no underscore), stable for a (seed, scenario) pair."""
    return hashlib.sha1(f"eprl-appworld:{seed}:{name}".encode()).hexdigest()[:7]


__all__ = ["SCENARIOS", "Scenario", "TaskPlan", "scenario_id"]
