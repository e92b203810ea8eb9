"""Venmo payments: pay a friend as told, or pay back everyone who asked by text message."""

from __future__ import annotations

import random
from datetime import timedelta

from ..world import EVENTS, PAYMENT_NOTES, WORLD_NOW, World
from .common import LOGIN, NO_OP_FAIL, NO_OP_PASS, TaskPlan, evaluation, pick, render

VENMO_PAY = evaluation("venmo_pay", (NO_OP_FAIL, NO_OP_FAIL, NO_OP_FAIL, NO_OP_PASS))
PAYBACK = evaluation("payback", (NO_OP_FAIL, NO_OP_FAIL, NO_OP_PASS, NO_OP_PASS))


def scenario_venmo_pay(world: World, rng: random.Random, n: int, used: set[int]) -> TaskPlan:
    person = pick(rng, world, used, ok=lambda p: bool(world.related(p.index, "friend")))
    friend = world.people[rng.choice(world.related(person.index, "friend"))]
    amount = round(rng.uniform(10, 90), 2) if n != 2 else float(rng.randint(10, 90))
    description = rng.choice(PAYMENT_NOTES)
    body = LOGIN + render(
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


def scenario_payback(world: World, rng: random.Random, n: int, used: set[int]) -> TaskPlan:
    person = pick(rng, world, used, ok=lambda p: len(world.contacts_of(p.index)) >= 4)
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
    body = LOGIN + render(
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
