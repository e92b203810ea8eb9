"""Generate a small AppWorld dataset offline, in AppWorld's own on-disk format, with the real apps.

Runs INSIDE the AppWorld venv (it imports ``appworld``); eprl calls it through
``eprl appworld make-data --out DIR``, or directly::

    .venv-appworld/bin/python envs/appworld/make_data.py --out DIR [--seed 0] [--validate]

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

Twelve scenarios (3 tasks each, task ids ``<scenario>_<n>`` as in AppWorld) over the supervisor,
phone, simple_note, spotify and venmo apps at difficulty 1, 2 and 3. Everything is drawn from
``random.Random(seed)`` and a seeded Faker under a frozen clock, so the same seed gives the
same files. ``--validate`` runs every reference solution through ``AppWorld`` in-process and
fails unless each one passes all of its tests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from textwrap import dedent
from typing import Any

WORLD_NOW = datetime(2023, 5, 18, 12, 0, 0)  # AppWorld's default task datetime
APPS_WITH_ACCOUNTS = ("phone", "simple_note", "spotify", "venmo")
SPLITS = ("train", "dev", "test_normal", "test_challenge")

GENRES = ("pop", "rock", "jazz", "indie", "electronic", "hip-hop", "folk", "classical")
PLAYLIST_TITLES = (
    "Morning Run",
    "Focus Flow",
    "Road Trip",
    "Rainy Day",
    "Late Night Drive",
    "Sunday Chill",
    "Workout Mix",
    "Dinner Party",
    "Study Session",
    "Summer Throwbacks",
    "Coffee Shop",
    "Deep Focus",
    "Party Starters",
    "Acoustic Evenings",
)
NOTE_TOPICS = (
    ("Grocery List", "shopping", "milk\neggs\nbread\ncoffee beans\napples"),
    ("Book Recommendations", "personal", "The Overstory\nPiranesi\nThe Dispossessed"),
    ("Team Meeting Notes", "work", "Discussed Q2 roadmap.\nAction: send the budget draft."),
    ("Travel Plans", "travel", "Flights booked for June.\nPack sunscreen and adapters."),
    ("Gift Ideas", "personal", "Board game for the twins.\nScarf for mom."),
    ("Workout Plan", "health", "Mon: run 5k\nWed: strength\nFri: swim"),
    ("Lentil Soup Recipe", "recipes", "Lentils, carrots, onion, cumin. Simmer 30 minutes."),
    ("Project Ideas", "ideas", "Home weather station.\nBudget tracker app."),
    ("Packing Checklist", "travel", "passport\ncharger\nhiking boots"),
    ("Quarterly Goals", "work", "Ship the onboarding revamp.\nHire two engineers."),
    ("Movie Watchlist", "personal", "Past Lives\nAftersun\nThe Holdovers"),
    ("Garden Notes", "ideas", "Tomatoes need staking.\nPlant basil next week."),
)
NOTE_TAGS = ("work", "personal", "ideas", "shopping", "travel", "health", "recipes")
PAYMENT_NOTES = (
    "dinner",
    "groceries",
    "movie tickets",
    "concert",
    "rent share",
    "coffee",
    "gas money",
    "birthday gift",
    "pizza night",
    "utilities",
    "brunch",
    "cab ride",
)
EVENTS = (
    "the cabin weekend",
    "the concert tickets",
    "last night's dinner",
    "the ski trip",
    "the museum tour",
    "the wine tasting",
    "the boat rental",
    "the escape room",
)
TEXT_SNIPPETS = (
    "Are we still on for Saturday?",
    "Running 10 minutes late!",
    "Can you send me that link?",
    "Happy Friday!",
    "Did you see the game last night?",
    "Call me when you are free.",
)


# ---------------------------------------------------------------- world plan (pure Python)


@dataclass
class Person:
    index: int
    first_name: str
    last_name: str
    email: str
    phone_number: str
    birthday: str
    sex: str
    passwords: dict[str, str]
    addresses: dict[str, dict[str, Any]]
    venmo_balance: float

    @property
    def name(self) -> str:
        return f"{self.first_name} {self.last_name}"


@dataclass
class World:
    people: list[Person]
    relationships: dict[tuple[int, int], list[str]]  # (i, j) -> labels, symmetric
    artists: list[dict[str, Any]]
    albums: list[dict[str, Any]]
    songs: list[dict[str, Any]]  # id = position + 1
    playlists: list[dict[str, Any]]  # {"owner", "title", "song_ids", "is_public", "created_at"}
    notes: list[dict[str, Any]]  # {"owner", "title", "content", "tags", "pinned", "created_at"}
    payments: list[dict[str, Any]]  # {"sender", "receiver", "amount", "description", "created_at"}
    texts: list[dict[str, Any]]  # {"sender", "receiver", "message", "created_at"}

    def related(self, person: int, label: str) -> list[int]:
        return sorted(
            j for (i, j), labels in self.relationships.items() if i == person and label in labels
        )

    def contacts_of(self, person: int) -> list[int]:
        return world_partners(self.relationships, person)


def _unique(draw, taken: set[str]) -> str:
    for _ in range(1000):
        value = draw()
        if value not in taken:
            taken.add(value)
            return value
    raise RuntimeError("could not draw a unique value in 1000 tries")


def plan_world(seed: int, n_people: int = 12) -> World:
    from faker import Faker

    rng = random.Random(seed)
    fake = Faker("en_US")
    fake.seed_instance(seed)
    first_names: set[str] = set()
    last_names: set[str] = set()
    phones: set[str] = set()
    people: list[Person] = []
    for index in range(n_people):
        sex = rng.choice(("male", "female"))
        first = _unique(
            fake.first_name_male if sex == "male" else fake.first_name_female, first_names
        )
        last = _unique(fake.last_name, last_names)
        phone = _unique(
            lambda: str(rng.randint(2, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(9)),
            phones,
        )
        addresses = {
            name: {
                "street_address": fake.street_address(),
                "city": fake.city(),
                "state": fake.state(),
                "country": "United States",
                "zip_code": rng.randint(10000, 99999),
            }
            for name in ("Home", "Work")
        }
        people.append(
            Person(
                index=index,
                first_name=first,
                last_name=last,
                email=f"{first}.{last}@gmail.com".lower(),
                phone_number=phone,
                birthday=fake.date_between(
                    datetime(1960, 1, 1), datetime(2002, 12, 31)
                ).isoformat(),
                sex=sex,
                passwords={
                    app: fake.password(length=12, special_chars=False) for app in APPS_WITH_ACCOUNTS
                },
                addresses=addresses,
                venmo_balance=round(rng.uniform(800, 2500), 2),
            )
        )

    # Households (roommates), companies (coworkers), and the rest friends; symmetric labels.
    order = list(range(n_people))
    rng.shuffle(order)
    households, cursor = [], 0
    for size in (3, 2, 3, 2, 2):
        households.append(order[cursor : cursor + size])
        cursor += size
    rng.shuffle(order)
    companies = [order[0:4], order[4:8], order[8:12]]
    relationships: dict[tuple[int, int], list[str]] = {}
    for i in range(n_people):
        for j in range(n_people):
            if i == j:
                continue
            labels = []
            if any(i in h and j in h for h in households):
                labels.append("roommate")
            if any(i in c and j in c for c in companies):
                labels.append("coworker")
            if not labels and rng.random() < 0.6:
                labels.append("friend")
            if labels:
                relationships[(i, j)] = labels
    for (i, j), labels in list(relationships.items()):  # make friendships symmetric
        relationships[(j, i)] = labels

    artist_names: set[str] = set()
    artists = [
        {
            "name": _unique(
                lambda: f"The {fake.word().title()} {fake.word().title()}s", artist_names
            ),
            "genre": rng.choice(GENRES),
        }
        for _ in range(8)
    ]
    titles: set[str] = set()
    albums, songs = [], []
    for album_index in range(10):
        artist_id = album_index % len(artists) + 1
        release = datetime(2010, 1, 1) + timedelta(days=rng.randint(0, 4500))
        albums.append(
            {
                "title": _unique(lambda: " ".join(fake.words(rng.randint(1, 3))).title(), titles),
                "artist_ids": [artist_id],
                "genre": artists[artist_id - 1]["genre"],
                "release_date": release,
            }
        )
        for _ in range(6):
            songs.append(
                {
                    "title": _unique(
                        lambda: " ".join(fake.words(rng.randint(2, 3))).title(), titles
                    ),
                    "artist_ids": [artist_id],
                    "album_id": album_index + 1,
                    "duration": rng.randint(140, 330),
                    "release_date": release,
                    "genre": artists[artist_id - 1]["genre"],
                    "play_count": rng.randint(1000, 900000),
                }
            )

    playlists = []
    for person in people:
        for title in rng.sample(PLAYLIST_TITLES, 3):
            playlists.append(
                {
                    "owner": person.index,
                    "title": title,
                    "song_ids": rng.sample(range(1, len(songs) + 1), rng.randint(4, 9)),
                    "is_public": rng.random() < 0.5,
                    "created_at": WORLD_NOW - timedelta(days=rng.randint(20, 600)),
                }
            )

    notes = []
    for person in people:
        for title, tag, content in rng.sample(NOTE_TOPICS, rng.randint(4, 7)):
            tags = sorted({tag, *rng.sample(NOTE_TAGS, rng.randint(0, 1))})
            notes.append(
                {
                    "owner": person.index,
                    "title": title,
                    "content": content,
                    "tags": tags,
                    "pinned": rng.random() < 0.2,
                    "created_at": WORLD_NOW - timedelta(days=rng.randint(2, 300)),
                }
            )

    payments = []
    for person in people:
        partners = world_partners(relationships, person.index)
        for _ in range(rng.randint(5, 9)):
            payments.append(
                {
                    "sender": person.index,
                    "receiver": rng.choice(partners),
                    "amount": round(rng.uniform(5, 120), 2),
                    "description": rng.choice(PAYMENT_NOTES),
                    "created_at": datetime(2023, 1, 2)
                    + timedelta(minutes=rng.randint(0, 60 * 24 * 134)),
                }
            )
    payments.sort(key=lambda p: p["created_at"])

    texts = []
    for person in people:
        for j in rng.sample(world_partners(relationships, person.index), 2):
            texts.append(
                {
                    "sender": person.index,
                    "receiver": j,
                    "message": rng.choice(TEXT_SNIPPETS),
                    "created_at": WORLD_NOW
                    - timedelta(days=rng.randint(1, 40), minutes=rng.randint(0, 600)),
                }
            )
    texts.sort(key=lambda t: t["created_at"])
    return World(people, relationships, artists, albums, songs, playlists, notes, payments, texts)


def world_partners(relationships: dict[tuple[int, int], list[str]], person: int) -> list[int]:
    """Everyone ``person`` has a relationship with (their phone contacts)."""
    return sorted(j for (i, j) in relationships if i == person)


# ---------------------------------------------------------------- writing rows with the apps' models


def _create(model: Any, rows: list[dict[str, Any]]) -> list[Any]:
    records = [model.create(**row) for row in rows]
    model.save_all(records)
    return records


def write_world(models: Any, world: World, api_docs: dict[str, dict[str, dict]]) -> None:
    """Fill an empty ModelCollection with the api docs and the world (ids are 1-based positions)."""
    _create(
        models.api_docs.ApiDoc,
        [
            {**{k: v for k, v in doc.items() if k != "app_name"}, "app_name_": doc["app_name"]}
            for docs in api_docs.values()
            for doc in docs.values()
        ],
    )
    people = world.people
    _create(
        models.admin.MainUser,
        [
            {
                "first_name": p.first_name,
                "last_name": p.last_name,
                "email": p.email,
                "phone_number": p.phone_number,
                "birthday": p.birthday,
                "sex": p.sex,
            }
            for p in people
        ],
    )
    _create(
        models.admin.AccountPassword,
        [
            {"main_user_id": p.index + 1, "account_name": app, "password": p.passwords[app]}
            for p in people
            for app in APPS_WITH_ACCOUNTS
        ],
    )
    registered = WORLD_NOW - timedelta(days=900)
    for app in ("simple_note", "spotify", "venmo"):
        rows = []
        for p in people:
            rows.append(
                {
                    "first_name": p.first_name,
                    "last_name": p.last_name,
                    "email": p.email,
                    "password": p.passwords[app],
                    "verified": True,
                    "created_at": registered,
                    "last_logged_in": registered,
                }
            )
            if app == "venmo":
                rows[-1]["venmo_balance"] = p.venmo_balance
        _create(getattr(models, app).User, rows)
    _create(
        models.phone.User,
        [
            {
                "first_name": p.first_name,
                "last_name": p.last_name,
                "phone_number": p.phone_number,
                "password": p.passwords["phone"],
                "created_at": registered,
                "last_logged_in": registered,
            }
            for p in people
        ],
    )

    _create(
        models.phone.Contact,
        [
            {
                "user_id": i + 1,
                "first_name": people[j].first_name,
                "last_name": people[j].last_name,
                "email": people[j].email,
                "phone_number": people[j].phone_number,
                "relationships": world.relationships[(i, j)],
                "birthday": people[j].birthday,
                "home_address": _address_text(people[j].addresses["Home"]),
                "work_address": _address_text(people[j].addresses["Work"]),
                "created_at": registered,
            }
            for i in range(len(people))
            for j in world.contacts_of(i)
        ],
    )
    _add_texts(models, world.texts)

    _create(
        models.venmo.Friendship,
        [
            {"user_id": i + 1, "friend_id": j + 1, "created_at": registered}
            for (i, j), labels in sorted(world.relationships.items())
            if "coworker" not in labels or len(labels) > 1
        ],
    )
    _create(
        models.venmo.Transaction,
        [
            {
                "sender_id": p["sender"] + 1,
                "receiver_id": p["receiver"] + 1,
                "amount": p["amount"],
                "description": p["description"],
                "created_at": p["created_at"],
                "updated_at": p["created_at"],
                "private": False,
            }
            for p in world.payments
        ],
    )

    _create(models.spotify.Artist, [{**a, "created_at": registered} for a in world.artists])
    _create(models.spotify.Album, world.albums)
    _create(models.spotify.Song, world.songs)
    _create(
        models.spotify.Playlist,
        [
            {
                "user_id": p["owner"] + 1,
                "title": p["title"],
                "is_public": p["is_public"],
                "created_at": p["created_at"],
            }
            for p in world.playlists
        ],
    )
    _create(
        models.spotify.PlaylistSong,
        [
            {"playlist_id": index + 1, "song_id": song_id, "added_at": p["created_at"]}
            for index, p in enumerate(world.playlists)
            for song_id in p["song_ids"]
        ],
    )

    _create(
        models.simple_note.Note,
        [
            {
                "user_id": n["owner"] + 1,
                "title": n["title"],
                "content": n["content"],
                "tags": n["tags"],
                "pinned": n["pinned"],
                "created_at": n["created_at"],
                "updated_at": n["created_at"],
            }
            for n in world.notes
        ],
    )


def _add_texts(models: Any, texts: list[dict[str, Any]]) -> None:
    phone = models.phone
    start = len(phone.GlobalTextMessage.all())
    _create(
        phone.GlobalTextMessage,
        [
            {
                "sender_id": t["sender"] + 1,
                "receiver_id": t["receiver"] + 1,
                "message": t["message"],
                "created_at": t["created_at"],
            }
            for t in texts
        ],
    )
    _create(
        phone.UserTextMessage,
        [
            {
                "global_text_message_id": start + index + 1,
                "user_id": owner + 1,
                "created_at": t["created_at"],
            }
            for index, t in enumerate(texts)
            for owner in (t["sender"], t["receiver"])
        ],
    )


def _address_text(address: dict[str, Any]) -> str:
    return (
        f"{address['street_address']}, {address['city']}, {address['state']}, {address['zip_code']}"
    )


# ---------------------------------------------------------------- scenarios

# Shared opening of every reference solution: the supervisor's passwords and identity.
LOGIN = """
    passwords = {item["account_name"]: item["password"] for item in apis.supervisor.show_account_passwords()}
    profile = apis.supervisor.show_profile()
"""

ANSWER_EVALUATION = '''
import json


def evaluate(test, public_data, private_data, main_user, models, ground_truth_answer):
    with test("""The answer given when completing the task is correct."""):
        task = models.end.supervisor.Task.all()[0]
        test.answer(json.loads(task.answer), ground_truth_answer)
    with test("""No data in any app was added, changed or removed."""):
        test.case(sorted(models.changed_model_names()), "==", [])
'''
ANSWER_TESTS = [
    ("The answer given when completing the task is correct.", "no_op_fail"),
    ("No data in any app was added, changed or removed.", "no_op_pass"),
]


@dataclass
class TaskPlan:
    supervisor: Person
    instruction: str
    solution_body: str
    answer: Any = None
    private_data: dict[str, Any] = field(default_factory=dict)
    public_data: dict[str, Any] = field(default_factory=dict)
    setup: Any = None  # callable(models) adding task-specific records
    texts: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Scenario:
    name: str
    difficulty: int
    required_apps: list[str]
    split: str
    evaluation: str
    tests: list[tuple[str, str]]
    make: Any  # callable(world, rng, n) -> TaskPlan


def _pick(rng: random.Random, world: World, used: set[int], ok=lambda p: True) -> Person:
    candidates = [p for p in world.people if p.index not in used and ok(p)]
    person = rng.choice(candidates)
    used.add(person.index)
    return person


def _render(template: str, **values: Any) -> str:
    """Fill <<name>> slots with Python literals (repr), so generated code is always valid."""
    return re.sub(r"<<(\w+)>>", lambda m: repr(values[m.group(1)]), template)


def scenario_address(world: World, rng: random.Random, n: int, used: set[int]) -> TaskPlan:
    person = _pick(rng, world, used)
    address_name, (key, phrase) = [
        ("Home", ("zip_code", "zip code")),
        ("Work", ("city", "city")),
        ("Home", ("street_address", "street address")),
    ][(n - 1) % 3]
    answer = person.addresses[address_name][key]
    body = LOGIN + _render(
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
    person = _pick(rng, world, used)
    tags = sorted(
        {t for note in world.notes if note["owner"] == person.index for t in note["tags"]}
    )
    tag = rng.choice(tags)
    count = sum(1 for note in world.notes if note["owner"] == person.index and tag in note["tags"])
    body = LOGIN + _render(
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
    person = _pick(rng, world, used)
    other = world.people[rng.choice(world.contacts_of(person.index))]
    body = LOGIN + _render(
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


def _spotify_login() -> str:
    return """
    token = apis.spotify.login(username=profile["email"], password=passwords["spotify"])["access_token"]
    playlists, page_index = [], 0
    while page := apis.spotify.show_playlist_library(access_token=token, page_index=page_index, page_limit=20):
        playlists += page
        page_index += 1
"""


def scenario_playlist_count(world: World, rng: random.Random, n: int, used: set[int]) -> TaskPlan:
    person = _pick(rng, world, used)
    playlist = rng.choice([p for p in world.playlists if p["owner"] == person.index])
    body = (
        LOGIN
        + _spotify_login()
        + _render(
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


VENMO_PAY_EVALUATION = '''
def evaluate(test, public_data, private_data, main_user, models, ground_truth_answer):
    me = models.end.venmo.User.find_one(email=main_user.email)
    added, updated, removed = models.changed_records("venmo.Transaction")
    with test("""Exactly one Venmo payment was sent, from the supervisor to the friend named in the task."""):
        test.case([(t.sender_id, t.receiver.email) for t in added], "==", [(me.id, private_data.receiver_email)])
    with test("""The payment has the requested amount."""):
        test.case(added[0].amount, "==", private_data.amount, tolerance=0.001)
    with test("""The payment has the requested note."""):
        test.case(added[0].description, "==", private_data.description, normalize_text=True)
    with test("""No Venmo transaction was changed or removed, and nothing outside Venmo payments was changed."""):
        test.case(updated + removed, "==", [])
        allowed = {"venmo.Transaction", "venmo.Notification", "venmo.User"}
        test.case(sorted(models.changed_model_names() - allowed), "==", [])
'''
VENMO_PAY_TESTS = [
    (
        "Exactly one Venmo payment was sent, from the supervisor to the friend named in the task.",
        "no_op_fail",
    ),
    ("The payment has the requested amount.", "no_op_fail"),
    ("The payment has the requested note.", "no_op_fail"),
    (
        "No Venmo transaction was changed or removed, and nothing outside Venmo payments was changed.",
        "no_op_pass",
    ),
]


def scenario_venmo_pay(world: World, rng: random.Random, n: int, used: set[int]) -> TaskPlan:
    person = _pick(rng, world, used, ok=lambda p: bool(world.related(p.index, "friend")))
    friend = world.people[rng.choice(world.related(person.index, "friend"))]
    amount = round(rng.uniform(10, 90), 2) if n != 2 else float(rng.randint(10, 90))
    description = rng.choice(PAYMENT_NOTES)
    body = LOGIN + _render(
        """
    token = apis.venmo.login(username=profile["email"], password=passwords["venmo"])["access_token"]
    friends = apis.venmo.search_friends(access_token=token, query=<<name>>, page_limit=20)
    friend = next(f for f in friends if f["first_name"] + " " + f["last_name"] == <<name>>)
    apis.venmo.create_transaction(
        receiver_email=friend["email"], amount=<<amount>>, description=<<description>>, access_token=token
    )
    apis.supervisor.complete_task()
    """,
        name=friend.name,
        amount=amount,
        description=description,
    )
    return TaskPlan(
        person,
        f"Send ${amount:.2f} to my friend {friend.name} on Venmo with the note '{description}'.",
        body,
        private_data={"receiver_email": friend.email, "amount": amount, "description": description},
    )


NOTE_APPEND_EVALUATION = '''
def evaluate(test, public_data, private_data, main_user, models, ground_truth_answer):
    added, updated, removed = models.changed_records("simple_note.Note")
    note = models.end.simple_note.Note.by_id(private_data.note_id)
    with test("""The note named in the task still exists and now ends with the requested line."""):
        test.case(note is not None)
        test.case(note.content.rstrip().splitlines()[-1], "==", private_data.line, normalize_text=True)
    with test("""The note's original content is kept."""):
        test.case(private_data.original_content, "in", note.content)
    with test("""The note is pinned."""):
        test.case(note.pinned, "is", True)
    with test("""No other note was added, changed or removed, and no other app data was changed."""):
        test.case(added + removed, "==", [])
        test.case([n.id for n in updated if n.id != private_data.note_id], "==", [])
        test.case(sorted(models.changed_model_names() - {"simple_note.Note"}), "==", [])
'''
NOTE_APPEND_TESTS = [
    ("The note named in the task still exists and now ends with the requested line.", "no_op_fail"),
    ("The note's original content is kept.", "no_op_pass"),
    ("The note is pinned.", "no_op_fail"),
    (
        "No other note was added, changed or removed, and no other app data was changed.",
        "no_op_pass",
    ),
]


def scenario_note_append(world: World, rng: random.Random, n: int, used: set[int]) -> TaskPlan:
    person = _pick(
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
    body = LOGIN + _render(
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


PLAYLIST_ADD_EVALUATION = '''
def evaluate(test, public_data, private_data, main_user, models, ground_truth_answer):
    added, updated, removed = models.changed_records("spotify.PlaylistSong")
    with test("""The requested song was added to the requested playlist."""):
        test.case([(s.playlist_id, s.song_id) for s in added], "==", [(private_data.playlist_id, private_data.song_id)])
    with test("""No song was removed from any playlist."""):
        test.case(removed, "==", [])
    with test("""Nothing outside the playlists' songs was changed."""):
        test.case(sorted(models.changed_model_names() - {"spotify.PlaylistSong", "spotify.Playlist"}), "==", [])
'''
PLAYLIST_ADD_TESTS = [
    ("The requested song was added to the requested playlist.", "no_op_fail"),
    ("No song was removed from any playlist.", "no_op_pass"),
    ("Nothing outside the playlists' songs was changed.", "no_op_pass"),
]


def scenario_playlist_add(world: World, rng: random.Random, n: int, used: set[int]) -> TaskPlan:
    person = _pick(rng, world, used)
    index, playlist = rng.choice(
        [(i, p) for i, p in enumerate(world.playlists) if p["owner"] == person.index]
    )
    song_id = rng.choice(
        [s for s in range(1, len(world.songs) + 1) if s not in playlist["song_ids"]]
    )
    song = world.songs[song_id - 1]
    artist = world.artists[song["artist_ids"][0] - 1]["name"]
    body = (
        LOGIN
        + _spotify_login()
        + _render(
            """
    playlist = next(p for p in playlists if p["title"] == <<playlist>>)
    songs = apis.spotify.search_songs(query=<<song>>, page_limit=20)
    song = next(s for s in songs if s["title"] == <<song>> and <<artist>> in [a["name"] for a in s["artists"]])
    apis.spotify.add_song_to_playlist(playlist_id=playlist["playlist_id"], song_id=song["song_id"], access_token=token)
    apis.supervisor.complete_task()
    """,
            playlist=playlist["title"],
            song=song["title"],
            artist=artist,
        )
    )
    return TaskPlan(
        person,
        f"Add the song '{song['title']}' by {artist} to my Spotify playlist '{playlist['title']}'.",
        body,
        private_data={"playlist_id": index + 1, "song_id": song_id},
    )


TEXT_EVALUATION = '''
def evaluate(test, public_data, private_data, main_user, models, ground_truth_answer):
    me = models.end.phone.User.find_one(phone_number=main_user.phone_number)
    added, updated, removed = models.changed_records("phone.GlobalTextMessage")
    with test("""Exactly one text message was sent, from the supervisor to the person named in the task."""):
        test.case([(m.sender_id, m.receiver.phone_number) for m in added], "==", [(me.id, private_data.phone_number)])
    with test("""The text message says what the task asked for."""):
        test.case(added[0].message, "==", private_data.message, normalize_text=True)
    with test("""No message was changed or removed and nothing outside phone messages was changed."""):
        test.case(updated + removed, "==", [])
        test.case(sorted(models.changed_model_names() - {"phone.GlobalTextMessage", "phone.UserTextMessage"}), "==", [])
'''
TEXT_TESTS = [
    (
        "Exactly one text message was sent, from the supervisor to the person named in the task.",
        "no_op_fail",
    ),
    ("The text message says what the task asked for.", "no_op_fail"),
    (
        "No message was changed or removed and nothing outside phone messages was changed.",
        "no_op_pass",
    ),
]


def _unique_relation(world: World, person: Person, label: str) -> list[int]:
    """People with that label whose first name is unique among the person's contacts."""
    firsts = [world.people[j].first_name for j in world.contacts_of(person.index)]
    return [
        j
        for j in world.related(person.index, label)
        if firsts.count(world.people[j].first_name) == 1
    ]


def scenario_text_relation(world: World, rng: random.Random, n: int, used: set[int]) -> TaskPlan:
    label = ("roommate", "coworker", "friend")[(n - 1) % 3]
    person = _pick(rng, world, used, ok=lambda p: bool(_unique_relation(world, p, label)))
    other = world.people[rng.choice(_unique_relation(world, person, label))]
    message = rng.choice(
        (
            "I will be home late tonight.",
            "Can you pick up milk on the way?",
            "Lunch tomorrow at noon?",
            "Thanks for your help today!",
        )
    )
    body = LOGIN + _render(
        """
    token = apis.phone.login(username=profile["phone_number"], password=passwords["phone"])["access_token"]
    contacts, page_index = [], 0
    while page := apis.phone.search_contacts(access_token=token, relationship=<<label>>, page_index=page_index, page_limit=20):
        contacts += page
        page_index += 1
    contact = next(c for c in contacts if c["first_name"] == <<first>>)
    apis.phone.send_text_message(phone_number=contact["phone_number"], message=<<message>>, access_token=token)
    apis.supervisor.complete_task()
    """,
        label=label,
        first=other.first_name,
        message=message,
    )
    return TaskPlan(
        person,
        f'Text my {label} {other.first_name} on my phone: "{message}"',
        body,
        private_data={"phone_number": other.phone_number, "message": message},
    )


PAYBACK_EVALUATION = '''
def evaluate(test, public_data, private_data, main_user, models, ground_truth_answer):
    me = models.end.venmo.User.find_one(email=main_user.email)
    added, updated, removed = models.changed_records("venmo.Transaction")
    sent = sorted((t.receiver.email, round(t.amount, 2)) for t in added if t.sender_id == me.id)
    expected = sorted((email, round(amount, 2)) for email, amount in private_data.payments)
    with test("""Every person who asked to be paid back for the event got exactly the amount they asked for."""):
        test.case(sent, "==", expected)
    with test("""Every payment carries the event as its note."""):
        test.case([t.description for t in added], "all ==", private_data.description, normalize_text=True)
    with test("""Nobody else was paid."""):
        test.case(sorted({e for e, _ in sent} - {e for e, _ in expected}), "==", [])
    with test("""Nothing outside Venmo payments was changed."""):
        test.case(updated + removed, "==", [])
        allowed = {"venmo.Transaction", "venmo.Notification", "venmo.User"}
        test.case(sorted(models.changed_model_names() - allowed), "==", [])
'''
PAYBACK_TESTS = [
    (
        "Every person who asked to be paid back for the event got exactly the amount they asked for.",
        "no_op_fail",
    ),
    ("Every payment carries the event as its note.", "no_op_fail"),
    ("Nobody else was paid.", "no_op_pass"),
    ("Nothing outside Venmo payments was changed.", "no_op_pass"),
]


def scenario_payback(world: World, rng: random.Random, n: int, used: set[int]) -> TaskPlan:
    person = _pick(rng, world, used, ok=lambda p: len(world.contacts_of(p.index)) >= 4)
    event, other_event = rng.sample(EVENTS, 2)
    creditors = rng.sample(world.contacts_of(person.index), 2 + (n == 3))
    others = [j for j in world.contacts_of(person.index) if j not in creditors]
    distractor = rng.choice(others)
    today = WORLD_NOW.replace(hour=8, minute=0)
    payments, texts = [], []
    for k, j in enumerate(creditors):
        amount = round(rng.uniform(12, 140), 2)
        payments.append([world.people[j].email, amount])
        texts.append(
            {
                "sender": j,
                "receiver": person.index,
                "created_at": today + timedelta(minutes=37 * k),
                "message": f"Hey! Your share for {event} comes to ${amount:.2f}. Venmo me when you can.",
            }
        )
    texts.append(
        {
            "sender": distractor,
            "receiver": person.index,
            "created_at": today + timedelta(minutes=150),
            "message": f"Hey! Your share for {other_event} comes to ${rng.uniform(12, 140):.2f}. Venmo me when you can.",
        }
    )
    body = LOGIN + _render(
        """
    phone_token = apis.phone.login(username=profile["phone_number"], password=passwords["phone"])["access_token"]
    venmo_token = apis.venmo.login(username=profile["email"], password=passwords["venmo"])["access_token"]
    messages, page_index = [], 0
    while page := apis.phone.search_text_messages(access_token=phone_token, query=<<event>>, page_index=page_index, page_limit=20):
        messages += page
        page_index += 1
    for message in messages:
        if <<event>> not in message["message"] or message["sender"]["phone_number"] == profile["phone_number"]:
            continue
        amount = float(re.search(r"\\$([0-9]+\\.[0-9]{2})", message["message"]).group(1))
        contacts = apis.phone.search_contacts(access_token=phone_token, query=message["sender"]["phone_number"])
        contact = next(c for c in contacts if c["phone_number"] == message["sender"]["phone_number"])
        apis.venmo.create_transaction(
            receiver_email=contact["email"], amount=amount, description=<<event>>, access_token=venmo_token
        )
    apis.supervisor.complete_task()
    """,
        event=event,
    )
    return TaskPlan(
        person,
        f"Some people texted me today asking me to pay them back my share for {event}. "
        f"Pay each of them on Venmo exactly what they asked for, with the note '{event}'.",
        body,
        private_data={"payments": payments, "description": event},
        texts=texts,
    )


NOTE_TO_PLAYLIST_EVALUATION = '''
def evaluate(test, public_data, private_data, main_user, models, ground_truth_answer):
    me = models.end.spotify.User.find_one(email=main_user.email)
    added, updated, removed = models.changed_records("spotify.Playlist")
    mine = [p for p in added if p.user_id == me.id and p.title.strip().lower() == private_data.title.lower()]
    with test("""A new Spotify playlist with the requested title was created in the supervisor's account."""):
        test.case(len(mine), "==", 1)
    with test("""The new playlist holds exactly the songs listed in the note."""):
        song_ids = sorted(s.song_id for s in models.end.spotify.PlaylistSong.find_all(playlist_id=mine[0].id))
        test.case(song_ids, "==", sorted(private_data.song_ids))
    with test("""The new playlist is private."""):
        test.case(mine[0].is_public, "is", False)
    with test("""No existing playlist was changed or removed and nothing outside Spotify playlists was changed."""):
        test.case(updated + removed, "==", [])
        test.case(len(added), "<=", 1)
        test.case(sorted(models.changed_model_names() - {"spotify.Playlist", "spotify.PlaylistSong"}), "==", [])
'''
NOTE_TO_PLAYLIST_TESTS = [
    (
        "A new Spotify playlist with the requested title was created in the supervisor's account.",
        "no_op_fail",
    ),
    ("The new playlist holds exactly the songs listed in the note.", "no_op_fail"),
    ("The new playlist is private.", "no_op_fail"),
    (
        "No existing playlist was changed or removed and nothing outside Spotify playlists was changed.",
        "no_op_pass",
    ),
]


def scenario_note_to_playlist(world: World, rng: random.Random, n: int, used: set[int]) -> TaskPlan:
    person = _pick(rng, world, used)
    taken = {p["title"] for p in world.playlists if p["owner"] == person.index}
    title = rng.choice([t for t in PLAYLIST_TITLES if t not in taken])
    song_ids = rng.sample(range(1, len(world.songs) + 1), 3 + n)
    note_title = f"Songs for {title}"
    lines = [f"- {world.songs[s - 1]['title']}" for s in song_ids]
    content = "Songs I want together:\n" + "\n".join(lines)

    def setup(models: Any) -> None:
        models.simple_note.Note.create_save(
            user_id=person.index + 1,
            title=note_title,
            content=content,
            tags=["ideas"],
            created_at=WORLD_NOW - timedelta(days=1),
            updated_at=WORLD_NOW - timedelta(days=1),
        )

    body = LOGIN + _render(
        """
    note_token = apis.simple_note.login(username=profile["email"], password=passwords["simple_note"])["access_token"]
    spotify_token = apis.spotify.login(username=profile["email"], password=passwords["spotify"])["access_token"]
    notes = apis.simple_note.search_notes(access_token=note_token, query=<<note_title>>, page_limit=20)
    note = next(n for n in notes if n["title"] == <<note_title>>)
    content = apis.simple_note.show_note(note_id=note["note_id"], access_token=note_token)["content"]
    titles = [line[2:].strip() for line in content.splitlines() if line.startswith("- ")]
    playlist_id = apis.spotify.create_playlist(title=<<title>>, is_public=False, access_token=spotify_token)["playlist_id"]
    for title in titles:
        songs = apis.spotify.search_songs(query=title, page_limit=20)
        song = next(s for s in songs if s["title"] == title)
        apis.spotify.add_song_to_playlist(playlist_id=playlist_id, song_id=song["song_id"], access_token=spotify_token)
    apis.supervisor.complete_task()
    """,
        note_title=note_title,
        title=title,
    )
    return TaskPlan(
        person,
        f"Create a private Spotify playlist titled '{title}' with exactly the songs listed in my "
        f"Simple Note note '{note_title}'.",
        body,
        private_data={"title": title, "song_ids": song_ids},
        setup=setup,
    )


def scenario_roommate_total(world: World, rng: random.Random, n: int, used: set[int]) -> TaskPlan:
    label = ("roommate", "coworker", "friend")[(n - 1) % 3]
    since = (datetime(2023, 1, 1) + timedelta(days=rng.randint(0, 90))).date()
    person = _pick(
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
    body = LOGIN + _render(
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


def scenario_text_top_song(world: World, rng: random.Random, n: int, used: set[int]) -> TaskPlan:
    label = ("coworker", "roommate", "friend")[(n - 1) % 3]

    def top_is_unique(person: Person) -> bool:
        return any(
            len({world.songs[s - 1]["play_count"] for s in p["song_ids"]}) == len(p["song_ids"])
            for p in world.playlists
            if p["owner"] == person.index
        )

    person = _pick(
        rng, world, used, ok=lambda p: bool(_unique_relation(world, p, label)) and top_is_unique(p)
    )
    other = world.people[rng.choice(_unique_relation(world, person, label))]
    playlist = rng.choice(
        [
            p
            for p in world.playlists
            if p["owner"] == person.index
            and len({world.songs[s - 1]["play_count"] for s in p["song_ids"]}) == len(p["song_ids"])
        ]
    )
    top = max(playlist["song_ids"], key=lambda s: world.songs[s - 1]["play_count"])
    message = world.songs[top - 1]["title"]
    body = (
        LOGIN
        + _spotify_login()
        + _render(
            """
    playlist = next(p for p in playlists if p["title"] == <<playlist>>)
    songs = [apis.spotify.show_song(song_id=song_id) for song_id in playlist["song_ids"]]
    top = max(songs, key=lambda s: s["play_count"])
    phone_token = apis.phone.login(username=profile["phone_number"], password=passwords["phone"])["access_token"]
    contacts, page_index = [], 0
    while page := apis.phone.search_contacts(access_token=phone_token, relationship=<<label>>, page_index=page_index, page_limit=20):
        contacts += page
        page_index += 1
    contact = next(c for c in contacts if c["first_name"] == <<first>>)
    apis.phone.send_text_message(phone_number=contact["phone_number"], message=top["title"], access_token=phone_token)
    apis.supervisor.complete_task()
    """,
            playlist=playlist["title"],
            label=label,
            first=other.first_name,
        )
    )
    return TaskPlan(
        person,
        f"Text my {label} {other.first_name} the title of the most played song in my Spotify "
        f"playlist '{playlist['title']}'. The message should be just the song title.",
        body,
        private_data={"phone_number": other.phone_number, "message": message},
    )


SCENARIOS = (
    Scenario("address", 1, [], "train", ANSWER_EVALUATION, ANSWER_TESTS, scenario_address),
    Scenario(
        "notetags",
        1,
        ["simple_note"],
        "train",
        ANSWER_EVALUATION,
        ANSWER_TESTS,
        scenario_note_tag_count,
    ),
    Scenario(
        "venmopay", 2, ["venmo"], "train", VENMO_PAY_EVALUATION, VENMO_PAY_TESTS, scenario_venmo_pay
    ),
    Scenario(
        "noteappend",
        2,
        ["simple_note"],
        "train",
        NOTE_APPEND_EVALUATION,
        NOTE_APPEND_TESTS,
        scenario_note_append,
    ),
    Scenario(
        "payback",
        3,
        ["phone", "venmo"],
        "train",
        PAYBACK_EVALUATION,
        PAYBACK_TESTS,
        scenario_payback,
    ),
    Scenario(
        "birthday", 1, ["phone"], "dev", ANSWER_EVALUATION, ANSWER_TESTS, scenario_contact_birthday
    ),
    Scenario(
        "playlistadd",
        2,
        ["spotify"],
        "dev",
        PLAYLIST_ADD_EVALUATION,
        PLAYLIST_ADD_TESTS,
        scenario_playlist_add,
    ),
    Scenario(
        "playlistcount",
        1,
        ["spotify"],
        "test_normal",
        ANSWER_EVALUATION,
        ANSWER_TESTS,
        scenario_playlist_count,
    ),
    Scenario(
        "textrelation",
        2,
        ["phone"],
        "test_normal",
        TEXT_EVALUATION,
        TEXT_TESTS,
        scenario_text_relation,
    ),
    Scenario(
        "notetoplaylist",
        3,
        ["simple_note", "spotify"],
        "test_normal",
        NOTE_TO_PLAYLIST_EVALUATION,
        NOTE_TO_PLAYLIST_TESTS,
        scenario_note_to_playlist,
    ),
    Scenario(
        "sentsince",
        3,
        ["phone", "venmo"],
        "test_challenge",
        ANSWER_EVALUATION,
        ANSWER_TESTS,
        scenario_roommate_total,
    ),
    Scenario(
        "texttopsong",
        3,
        ["phone", "spotify"],
        "test_challenge",
        TEXT_EVALUATION,
        TEXT_TESTS,
        scenario_text_top_song,
    ),
)


def scenario_id(seed: int, name: str) -> str:
    """AppWorld-style 7-hex scenario id (no underscore), stable for a (seed, scenario) pair."""
    return hashlib.sha1(f"eprl-appworld:{seed}:{name}".encode()).hexdigest()[:7]


# ---------------------------------------------------------------- writing the dataset


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
    _create(
        models.supervisor.AccountPassword,
        [
            {"supervisor_id": sup.id, "account_name": app, "password": person.passwords[app]}
            for app in APPS_WITH_ACCOUNTS
        ],
    )
    _create(
        models.supervisor.Address,
        [
            {"supervisor_id": sup.id, "name": name, **address}
            for name, address in person.addresses.items()
        ],
    )
    models.supervisor.Task.create_save(supervisor_id=sup.id, instruction=plan.instruction)
    if plan.texts:
        _add_texts(models, plan.texts)
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
            [{"requirement": r, "label": label} for r, label in scenario.tests], indent=2
        ),
        "evaluation.py": canary + dedent(scenario.evaluation).lstrip(),
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
    marker = os.path.join(data_dir, "eprl_generated.json")
    if os.path.isdir(data_dir) and os.listdir(data_dir) and not os.path.isfile(marker):
        raise SystemExit(
            f"refusing to overwrite {data_dir}: it exists and was not generated by eprl "
            "(real AppWorld data?); choose another --out"
        )
    shutil.rmtree(data_dir, ignore_errors=True)
    os.makedirs(data_dir)
    _write_json(
        marker, {"generator": "envs/appworld/make_data.py", "seed": seed, "complete": False}
    )
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
                "generator": "envs/appworld/make_data.py",
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


def validate(out: str, task_ids: list[str]) -> list[str]:
    """Check every task through AppWorld in-process, as AppWorld's own generator does.

    Doing nothing must fail exactly the tests labelled ``no_op_fail``; the reference solution
    must then pass all tests. Returns one message per failed task (empty if all are good).
    """
    from appworld import AppWorld

    failures = []
    for task_id in task_ids:
        experiment = f"eprl_validate_{task_id}"
        with AppWorld(
            task_id=task_id, experiment_name=experiment, ground_truth_mode="full"
        ) as world:
            no_op = world.evaluate(suppress_errors=True)
            expected = [
                t["requirement"]
                for t in world.task.ground_truth.test_data
                if t["label"] == "no_op_fail"
            ]
            if sorted(f["requirement"] for f in no_op.failures) != sorted(expected):
                failures.append(
                    f"{task_id}: doing nothing failed {[f['requirement'] for f in no_op.failures]}, "
                    f"expected exactly the no_op_fail tests {expected}"
                )
            code = (
                world.task.ground_truth.compiled_solution_code + "\n\nsolution(apis, requester)\n"
            )
            output = world.execute(code)
            tracker = world.evaluate(suppress_errors=True)
            if not tracker.success:
                traces = [f["requirement"] + "\n" + f["trace"] for f in tracker.failures]
                failures.append(
                    f"{task_id}: reference solution output {output[-800:]!r}; failed: {traces}"
                )
        shutil.rmtree(os.path.join(out, "experiments", "outputs", experiment), ignore_errors=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="AppWorld root to write (data/ goes under it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks-per-scenario", type=int, default=3)
    parser.add_argument(
        "--validate", action="store_true", help="run every reference solution through AppWorld"
    )
    args = parser.parse_args(argv)
    start = time.time()
    splits = generate(args.out, seed=args.seed, tasks_per_scenario=args.tasks_per_scenario)
    n_tasks = sum(len(ids) for ids in splits.values())
    print(
        f"wrote {n_tasks} tasks ({', '.join(f'{s}={len(i)}' for s, i in splits.items())}) "
        f"under {os.path.join(os.path.abspath(args.out), 'data')} in {time.time() - start:.1f}s"
    )
    if args.validate:
        failures = validate(os.path.abspath(args.out), [t for ids in splits.values() for t in ids])
        if failures:
            print(
                "reference solutions that did not pass all tests:\n" + "\n".join(failures),
                file=sys.stderr,
            )
            return 1
        print(
            f"validated: all {n_tasks} reference solutions pass all tests ({time.time() - start:.1f}s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
