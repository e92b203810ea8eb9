"""Writing the planned world into AppWorld's databases, through the apps' own models.

Rows go in with the apps' ``Model.create`` + ``save_all``, so the databases have AppWorld's own
schemas and defaults; ids are 1-based positions in the ``World`` lists.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from .world import APPS_WITH_ACCOUNTS, WORLD_NOW, World


def create_rows(model: Any, rows: list[dict[str, Any]]) -> list[Any]:
    """Create ``rows`` through the app's own ``model`` (its defaults fill the rest) and save them."""
    records = [model.create(**row) for row in rows]
    model.save_all(records)
    return records


def write_world(models: Any, world: World, api_docs: dict[str, dict[str, dict]]) -> None:
    """Fill an empty ModelCollection with the api docs and the world (ids are 1-based positions)."""
    create_rows(
        models.api_docs.ApiDoc,
        [
            {**{k: v for k, v in doc.items() if k != "app_name"}, "app_name_": doc["app_name"]}
            for docs in api_docs.values()
            for doc in docs.values()
        ],
    )
    people = world.people
    create_rows(
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
    create_rows(
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
        create_rows(getattr(models, app).User, rows)
    create_rows(
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

    create_rows(
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
    add_texts(models, world.texts)

    create_rows(
        models.venmo.Friendship,
        [
            {"user_id": i + 1, "friend_id": j + 1, "created_at": registered}
            for (i, j), labels in sorted(world.relationships.items())
            if "coworker" not in labels or len(labels) > 1
        ],
    )
    create_rows(
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

    create_rows(models.spotify.Artist, [{**a, "created_at": registered} for a in world.artists])
    create_rows(models.spotify.Album, world.albums)
    create_rows(models.spotify.Song, world.songs)
    create_rows(
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
    create_rows(
        models.spotify.PlaylistSong,
        [
            {"playlist_id": index + 1, "song_id": song_id, "added_at": p["created_at"]}
            for index, p in enumerate(world.playlists)
            for song_id in p["song_ids"]
        ],
    )

    create_rows(
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


def add_texts(models: Any, texts: list[dict[str, Any]]) -> None:
    """Text messages as the phone app stores them: one global message, one copy per party."""
    phone = models.phone
    start = len(phone.GlobalTextMessage.all())
    create_rows(
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
    create_rows(
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
