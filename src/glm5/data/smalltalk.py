"""The chat family: greetings, identity, capabilities, thanks, goodbye. One fixed reply per intent (a tiny model
learns a fixed reply for an intent it recognises; varied replies would only add noise); the user side varies, and
the split is by user template (disjoint phrasings per intent), so heldout measures intent recognition.
"""

from __future__ import annotations

from .common import check_split, rng_for
from .example import Example

IDENTITY = "I am GLM-5, a small GLM-5 model trained on a CPU by glm5."
SKILLS = ("I can do arithmetic, answer questions about my world, find facts in long text, and use a calculator.")
_NAMES = ("Alice", "Bob", "Chen", "Dana", "Emeka", "Fatima", "Giulia", "Hiro", "Ingrid", "Kofi", "Lea", "Maya")

# intent: (reasoning, reply, train user templates, heldout user templates); {name} is filled from _NAMES.
INTENTS = {
    "greeting": (
        "The user greets me. I greet them back and offer help.", "Hello! How can I help you today?",
        ("Hello!", "Hi there.", "Hey!", "Good morning!", "Hi, I'm {name}.", "Hello, my name is {name}.",
         "Good evening.", "Hey there, how are you?"),
        ("Greetings!", "Hi! This is {name}.", "Good afternoon!", "Howdy.")),
    "identity": (
        "The user asks who I am. I state my identity.", IDENTITY,
        ("Who are you?", "What are you?", "What is your name?", "Tell me about yourself.", "Are you a person?",
         "Which model are you?"),
        ("Introduce yourself.", "What should I call you?", "What kind of assistant are you?")),
    "skills": (
        "The user asks what I can do. I list my skills.", f"{IDENTITY} {SKILLS}",
        ("What can you do?", "How can you help me?", "What are you good at?", "What are your skills?",
         "What kind of questions can you answer?", "Can you help me?"),
        ("What tasks can you handle?", "What are your abilities?", "Tell me what you are able to do.")),
    "thanks": (
        "The user thanks me. I say they are welcome.", "You're welcome! Happy to help.",
        ("Thanks!", "Thank you.", "Thanks a lot.", "Thank you very much!", "Thanks, that helps.",
         "Thanks, {name} here, that was useful."),
        ("Much appreciated.", "Thank you so much, that was great.", "Cheers, thanks!")),
    "goodbye": (
        "The user says goodbye. I say goodbye too.", "Goodbye! Have a nice day.",
        ("Goodbye!", "Bye.", "See you later.", "Bye for now!", "I have to go now, bye.", "Good night!"),
        ("Farewell!", "See you soon.", "Talk to you later, bye.")),
}


def chat(split: str, n: int, seed: int = 0) -> list[Example]:
    check_split(split)
    rng = rng_for("chat", split, seed)
    intents = sorted(INTENTS)
    out = []
    for _ in range(n):
        intent = rng.choice(intents)
        reasoning, reply, train, heldout = INTENTS[intent]
        template = rng.choice(heldout if split == "heldout" else train)
        messages = [{"role": "user", "content": template.format(name=rng.choice(_NAMES))},
                    {"role": "assistant", "reasoning_content": reasoning, "content": reply}]
        out.append(Example("chat", messages, reply, meta={"intent": intent, "template": template}))
    return out
