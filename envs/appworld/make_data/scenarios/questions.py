"""Questions: the supervisor asks for a fact; the answer goes to ``complete_task(answer=...)``.

All of them share one evaluation (``evaluate_answer.py.txt``): the answer is right, and no app
data changed.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from ..world import World
from .common import (
    LOGIN,
    NO_OP_FAIL,
    NO_OP_PASS,
    SPOTIFY_PLAYLISTS,
    TaskPlan,
    evaluation,
    pick,
    render,
)

ANSWER = evaluation("answer", (NO_OP_FAIL, NO_OP_PASS))


def scenario_address(world: World, rng: random.Random, n: int, used: set[int]) -> TaskPlan:
    person = pick(rng, world, used)
    address_name, (key, phrase) = [
        ("Home", ("zip_code", "zip code")),
        ("Work", ("city", "city")),
        ("Home", ("street_address", "street address")),
    ][(n - 1) % 3]
    answer = person.addresses[address_name][key]
    body = LOGIN + render(
        """
    address = next(a for a in apis.supervisor.show_addresses() if a["name"] == <<name>>)
    apis.supervisor.complete_task(answer=address[<<key>>])
    """,
        name=address_name,
        key=key,
    )
    return TaskPlan(
        person,
        f"What is the {phrase} of my {address_name.lower()} address? Answer with just the {phrase}.",
        body,
        answer=answer,
    )


def scenario_note_tag_count(world: World, rng: random.Random, n: int, used: set[int]) -> TaskPlan:
    person = pick(rng, world, used)
    tags = sorted(
        {t for note in world.notes if note["owner"] == person.index for t in note["tags"]}
    )
    tag = rng.choice(tags)
    count = sum(1 for note in world.notes if note["owner"] == person.index and tag in note["tags"])
    body = LOGIN + render(
        """
    token = apis.simple_note.login(username=profile["email"], password=passwords["simple_note"])["access_token"]
    notes, page_index = [], 0
    while page := apis.simple_note.search_notes(access_token=token, page_index=page_index, page_limit=20):
        notes += page
        page_index += 1
    apis.supervisor.complete_task(answer=sum(1 for note in notes if <<tag>> in note["tags"]))
    """,
        tag=tag,
    )
    return TaskPlan(
        person,
        f"How many of my Simple Note notes are tagged '{tag}'? Answer with just the number.",
        body,
        answer=count,
    )


def scenario_contact_birthday(world: World, rng: random.Random, n: int, used: set[int]) -> TaskPlan:
    person = pick(rng, world, used)
    other = world.people[rng.choice(world.contacts_of(person.index))]
    body = LOGIN + render(
        """
    token = apis.phone.login(username=profile["phone_number"], password=passwords["phone"])["access_token"]
    contacts = apis.phone.search_contacts(access_token=token, query=<<name>>, page_limit=20)
    contact = next(c for c in contacts if c["first_name"] + " " + c["last_name"] == <<name>>)
    apis.supervisor.complete_task(answer=contact["birthday"])
    """,
        name=other.name,
    )
    return TaskPlan(
        person,
        f"When is {other.name}'s birthday according to my phone contacts? "
        "Answer in YYYY-MM-DD format.",
        body,
        answer=other.birthday,
    )


def scenario_playlist_count(world: World, rng: random.Random, n: int, used: set[int]) -> TaskPlan:
    person = pick(rng, world, used)
    playlist = rng.choice([p for p in world.playlists if p["owner"] == person.index])
    body = (
        LOGIN
        + SPOTIFY_PLAYLISTS
        + render(
            """
    playlist = next(p for p in playlists if p["title"] == <<title>>)
    songs = apis.spotify.show_playlist(playlist_id=playlist["playlist_id"], access_token=token)["songs"]
    apis.supervisor.complete_task(answer=len(songs))
    """,
            title=playlist["title"],
        )
    )
    return TaskPlan(
        person,
        f"How many songs are in my Spotify playlist '{playlist['title']}'? "
        "Answer with just the number.",
        body,
        answer=len(playlist["song_ids"]),
    )


def scenario_roommate_total(world: World, rng: random.Random, n: int, used: set[int]) -> TaskPlan:
    label = ("roommate", "coworker", "friend")[(n - 1) % 3]
    since = (datetime(2023, 1, 1) + timedelta(days=rng.randint(0, 90))).date()
    person = pick(
        rng,
        world,
        used,
        ok=lambda p: any(
            pay["sender"] == p.index
            and pay["receiver"] in world.related(p.index, label)
            and pay["created_at"].date() >= since
            for pay in world.payments
        ),
    )
    related = set(world.related(person.index, label))
    total = round(
        sum(
            p["amount"]
            for p in world.payments
            if p["sender"] == person.index
            and p["receiver"] in related
            and p["created_at"].date() >= since
        ),
        2,
    )
    body = LOGIN + render(
        """
    phone_token = apis.phone.login(username=profile["phone_number"], password=passwords["phone"])["access_token"]
    venmo_token = apis.venmo.login(username=profile["email"], password=passwords["venmo"])["access_token"]
    emails, page_index = set(), 0
    while page := apis.phone.search_contacts(access_token=phone_token, relationship=<<label>>, page_index=page_index, page_limit=20):
        emails |= {c["email"] for c in page}
        page_index += 1
    total, page_index = 0.0, 0
    while page := apis.venmo.show_transactions(
        access_token=venmo_token, direction="sent", min_created_at=<<since>>, page_index=page_index, page_limit=20
    ):
        total += sum(t["amount"] for t in page if t["receiver"]["email"] in emails)
        page_index += 1
    apis.supervisor.complete_task(answer=round(total, 2))
    """,
        label=label,
        since=since.isoformat(),
    )
    plural = {"roommate": "roommates", "coworker": "coworkers", "friend": "friends"}[label]
    return TaskPlan(
        person,
        f"How much money in total have I sent to my {plural} (as listed in my phone contacts) on "
        f"Venmo since {since.isoformat()}? Answer with just the amount.",
        body,
        answer=total,
    )
