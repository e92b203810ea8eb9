"""Spotify playlist edits: add a song to a playlist, or build a playlist from a note's list."""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

from ..world import PLAYLIST_TITLES, WORLD_NOW, World
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

PLAYLIST_ADD = evaluation("playlist_add", (NO_OP_FAIL, NO_OP_PASS, NO_OP_PASS))
NOTE_TO_PLAYLIST = evaluation("note_to_playlist", (NO_OP_FAIL, NO_OP_FAIL, NO_OP_FAIL, NO_OP_PASS))


def scenario_playlist_add(world: World, rng: random.Random, n: int, used: set[int]) -> TaskPlan:
    person = pick(rng, world, used)
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
        + SPOTIFY_PLAYLISTS
        + render(
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


def scenario_note_to_playlist(world: World, rng: random.Random, n: int, used: set[int]) -> TaskPlan:
    person = pick(rng, world, used)
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

    body = LOGIN + render(
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
