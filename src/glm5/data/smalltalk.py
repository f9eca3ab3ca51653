"""The chat family: greetings, identity, capabilities, thanks, goodbye. One fixed reply per intent (a tiny model
learns a fixed reply for an intent it recognises; varied replies would only add noise); the user side varies, and
the split is by user template (disjoint phrasings per intent), so heldout measures intent recognition.

Training phrasings are many (a handful per intent taught a small model those strings, not the intent: held-out
small talk came back as refusals) and half of them come typed the way people type (lower case, no final
punctuation, a filler word before or after); held-out ones are asked as written. No training message, typed or not,
equals a held-out template up to case and punctuation (tests/test_data_reliability.py).
"""

from __future__ import annotations

import random
import re

from .common import check_split, rng_for
from .example import Example

IDENTITY = "I am GLM-5, a small GLM-5 model trained on a CPU by glm5."
SKILLS = ("I can do arithmetic, answer questions about my world, find facts in long text, and use a calculator.")
_NAMES = ("Alice", "Bob", "Chen", "Dana", "Emeka", "Fatima", "Giulia", "Hiro", "Ingrid", "Kofi", "Lea", "Maya")

# intent: (reasoning, reply, train user templates, heldout user templates); {name} is filled from _NAMES. No training
# template shares a held-out one's key words.
INTENTS = {
    "greeting": (
        "The user greets me. I greet them back and offer help.", "Hello! How can I help you today?",
        ("Hello!", "Hi there.", "Hey!", "Good morning!", "Hi, I'm {name}.", "Hello, my name is {name}.",
         "Good evening.", "Hey there, how are you?", "Hiya!", "Hello there!", "Hi!", "Hey, good to see you.",
         "Morning!", "Yo!", "Hi, how's it going?", "Hello, anyone there?", "Hey hey!", "Good day!",
         "Hi, nice to meet you.", "Hello again!", "Hey, {name} here."),
        ("Greetings!", "Hi! This is {name}.", "Good afternoon!", "Howdy.")),
    "identity": (
        "The user asks who I am. I state my identity.", IDENTITY,
        ("Who are you?", "What are you?", "What is your name?", "Tell me about yourself.", "Are you a person?",
         "Which model are you?", "Who am I talking to?", "What's your name?", "Are you a bot?", "Are you human?",
         "What model is this?", "Who made you?", "What exactly are you?", "Tell me who you are.", "Who is this?",
         "Are you an AI?", "Do you have a name?", "Which AI are you?"),
        ("Introduce yourself.", "What should I call you?", "What kind of assistant are you?")),
    "skills": (
        "The user asks what I can do. I list my skills.", f"{IDENTITY} {SKILLS}",
        ("What can you do?", "How can you help me?", "What are you good at?", "What are your skills?",
         "What kind of questions can you answer?", "Can you help me?", "What can you help with?",
         "What do you know how to do?", "What are you capable of?", "Show me what you can do.",
         "What things can you do?", "How can you be useful?", "What is your specialty?",
         "Can you do anything useful?", "What sort of things do you do?", "List your features.",
         "What jobs can you do?", "What services do you offer?"),
        ("What tasks can you handle?", "What are your abilities?", "Tell me what you are able to do.")),
    "thanks": (
        "The user thanks me. I say they are welcome.", "You're welcome! Happy to help.",
        ("Thanks!", "Thank you.", "Thanks a lot.", "Thank you very much!", "Thanks, that helps.",
         "Thanks, {name} here, that was useful.", "Thx!", "Thank you!", "Many thanks.", "Thanks so much!",
         "Great, thanks.", "Perfect, thank you.", "Awesome, thanks!", "Thanks for the help.", "Thank you kindly.",
         "Ty!", "Thanks a bunch!", "That was helpful, thanks."),
        ("Much appreciated.", "Thank you so much, that was great.", "Cheers, thanks!")),
    "goodbye": (
        "The user says goodbye. I say goodbye too.", "Goodbye! Have a nice day.",
        ("Goodbye!", "Bye.", "See you later.", "Bye for now!", "I have to go now, bye.", "Good night!", "Bye!",
         "Goodbye.", "See ya!", "Later!", "Catch you later.", "I'm off, bye!", "Bye bye!", "Have a good one, bye.",
         "Take care!", "Until next time!", "Gotta go, bye.", "Good night, bye!"),
        ("Farewell!", "See you soon.", "Talk to you later, bye.")),
}
_BEFORE = ("oh ", "well, ", "ok ", "hmm, ", "so ")
_AFTER = (" :)", " lol", "!!", " then", " haha")


def normalized(text: str) -> str:
    """Lower case, letters, digits and single spaces only: how the split compares phrasings."""
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())


def typed(rng: random.Random, text: str) -> str:
    """A training message as people type it: lower case, no final punctuation, or a filler word around it."""
    how = rng.randrange(4)
    if how == 0:
        return text.lower()
    if how == 1:
        return text.rstrip(".!?")
    if how == 2:
        return rng.choice(_BEFORE) + text[0].lower() + text[1:]
    return text.rstrip(".!?") + rng.choice(_AFTER)


def chat(split: str, n: int, seed: int = 0) -> list[Example]:
    check_split(split)
    rng = rng_for("chat", split, seed)
    intents = sorted(INTENTS)
    out = []
    for _ in range(n):
        intent = rng.choice(intents)
        reasoning, reply, train, heldout = INTENTS[intent]
        template = rng.choice(heldout if split == "heldout" else train)
        text = template.format(name=rng.choice(_NAMES))
        if split == "train" and rng.random() < 0.5:
            text = typed(rng, text)
        messages = [{"role": "user", "content": text},
                    {"role": "assistant", "reasoning_content": reasoning, "content": reply}]
        out.append(Example("chat", messages, reply, meta={"intent": intent, "template": template}))
    return out
