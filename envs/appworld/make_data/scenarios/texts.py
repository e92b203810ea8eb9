"""Phone text messages: text a contact found by relationship, with given or looked-up words."""

from __future__ import annotations

import random

from ..world import Person, World
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

TEXT_MESSAGE = evaluation("text_message", (NO_OP_FAIL, NO_OP_FAIL, NO_OP_PASS))


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
    person = pick(rng, world, used, ok=lambda p: bool(_unique_relation(world, p, label)))
    other = world.people[rng.choice(_unique_relation(world, person, label))]
    message = rng.choice(
        (
            "I will be home late tonight.",
            "Can you pick up milk on the way?",
            "Lunch tomorrow at noon?",
            "Thanks for your help today!",
        )
    )
    body = LOGIN + render(
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


def scenario_text_top_song(world: World, rng: random.Random, n: int, used: set[int]) -> TaskPlan:
    label = ("coworker", "roommate", "friend")[(n - 1) % 3]

    def top_is_unique(person: Person) -> bool:
        return any(
            len({world.songs[s - 1]["play_count"] for s in p["song_ids"]}) == len(p["song_ids"])
            for p in world.playlists
            if p["owner"] == person.index
        )

    person = pick(
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
        + SPOTIFY_PLAYLISTS
        + render(
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
