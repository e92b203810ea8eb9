"""The generated world, planned in pure Python before anything touches AppWorld's databases.

Twelve people with accounts on the phone, simple_note, spotify and venmo apps, their
relationships (roommates, coworkers, friends), a Spotify catalogue with playlists, Simple Note
notes, Venmo payments and text messages. Everything is drawn from ``random.Random(seed)`` and a
Faker seeded with the same seed, in a fixed order, so one seed always plans the same world.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

WORLD_NOW = datetime(2023, 5, 18, 12, 0, 0)  # AppWorld's default task datetime
APPS_WITH_ACCOUNTS = ("phone", "simple_note", "spotify", "venmo")

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


@dataclass
class Person:
    """One person of the world; ``index`` is their position (their app user id is index + 1)."""

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
    """Everything the base databases hold, by position (ids are 1-based positions)."""

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
        """The people ``person`` has a relationship labelled ``label`` with."""
        return sorted(
            j for (i, j), labels in self.relationships.items() if i == person and label in labels
        )

    def contacts_of(self, person: int) -> list[int]:
        """Everyone in ``person``'s phone contacts."""
        return world_partners(self.relationships, person)


def _unique(draw: Callable[[], str], taken: set[str]) -> str:
    for _ in range(1000):
        value = draw()
        if value not in taken:
            taken.add(value)
            return value
    raise RuntimeError("could not draw a unique value in 1000 tries")


def plan_world(seed: int, n_people: int = 12) -> World:
    """The world of ``seed``; the draws' order is part of the data format (do not reorder)."""
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
