"""What a user may ask a tool to do, and the tools a user may declare for it: the catalog behind the `tool_choice`
family (call a declared tool, or answer without one) and the tool-less requests of the `scope` family ("I can't look
up the weather: I have no tool for that.").

A capability has user requests (templates with {slots}), slot values, a refusal ("look up the weather"), and several
tools that do it, each with its own name, description and parameter names: a model must read the declared tools,
not remember one name per request. Results are canned strings built from the arguments (a tool's output is whatever
its runtime says; the model only has to copy it into the answer).

Splits, disjoint by construction: each capability's requests and its tools are two disjoint lists (train, heldout),
so a held-out chat uses request wordings and tool names that no training chat contains. The capabilities, slot values
and refusals are shared: they are what the model must carry over to new names and wordings.

Training chats mostly declare made-up tools (`made_up_tool`): a name from word pools that share no word with any
held-out name, one of the capability's training descriptions, and parameter names that are the capability's own or
generic ones. With a handful of fixed names per capability a small model learns the names by heart and writes them
whatever is declared (a first run called train-split names in every held-out chat); with names it cannot have seen,
the only way to call right is to read the declaration and copy the name and parameters from it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Callable

from ..tokenizer_train import CALCULATOR_TOOL

# Cities a request names: none of them is a real name the scope family asks about (its held-out names are never
# copied in a training chat).
CITIES = ("Lima", "Oslo", "Denver", "Santiago", "Hanoi", "Quito", "Kyoto", "Porto", "Zurich", "Perth", "Dakar",
          "Bogota", "Seattle", "Munich", "Naples", "Accra", "Tunis", "Riga", "Tallinn", "Hamburg")
_WEATHER = ("sunny", "cloudy", "light rain", "snow", "windy", "fog", "clear skies", "thunderstorms")
_EMAILS = ("dana@example.com", "kofi.mensah@example.org", "lea@mail.example", "hiro@example.net", "team@example.com",
           "maya.ortiz@example.com", "support@example.org", "chen.wei@example.net")
_BODIES = ("the meeting moves to Friday", "I will be ten minutes late", "the report is ready", "lunch is at noon",
           "please call me back", "the tickets are booked", "happy birthday", "the server is back up")
_CURRENCIES = ("USD", "EUR", "JPY", "GBP", "CHF", "CAD", "INR", "BRL")
_PHRASES = {  # phrase: its translations (real ones, so no tool result teaches a wrong fact)
    "thank you": {"French": "merci", "Spanish": "gracias", "German": "danke", "Italian": "grazie"},
    "good morning": {"French": "bonjour", "Spanish": "buenos dias", "German": "guten Morgen", "Italian": "buongiorno"},
    "good night": {"French": "bonne nuit", "Spanish": "buenas noches", "German": "gute Nacht",
                   "Italian": "buona notte"},
    "goodbye": {"French": "au revoir", "Spanish": "adios", "German": "auf Wiedersehen", "Italian": "arrivederci"},
    "please": {"French": "s'il vous plait", "Spanish": "por favor", "German": "bitte", "Italian": "per favore"},
    "cheese": {"French": "fromage", "Spanish": "queso", "German": "Kaese", "Italian": "formaggio"},
    "the cat": {"French": "le chat", "Spanish": "el gato", "German": "die Katze", "Italian": "il gatto"},
    "water": {"French": "eau", "Spanish": "agua", "German": "Wasser", "Italian": "acqua"},
}
_SONGS = ("Blue River", "Midnight Train", "Paper Moon", "Golden Hour", "Silent Harbor", "Northern Lights",
          "Summer Rain", "Old Road Home")
_QUERIES = ("cheap flights to Lima", "how to repot a cactus", "bread recipes", "the tallest mountains",
            "bike repair shops", "rainy day activities", "how tides work", "chess openings")
_SYMBOLS = ("AAPL", "MSFT", "TSLA", "NVDA", "AMZN", "IBM", "SONY", "SAP")
_EVENTS = ("dentist appointment", "team meeting", "yoga class", "dinner with Sam", "project review", "flight to Oslo")
_DATES = ("May 3", "June 14", "July 1", "August 22", "September 9", "October 30", "November 5", "December 12")
_WORDS = {"ephemeral": "lasting a very short time", "serendipity": "finding good things by chance",
          "ubiquitous": "present everywhere", "meticulous": "very careful about details",
          "gregarious": "fond of company", "laconic": "using very few words", "candid": "honest and direct",
          "frugal": "careful with money"}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    params: dict[str, str]  # slot -> this tool's parameter name

    def schema(self, types: dict[str, str]) -> dict:
        props = {p: {"type": types.get(s, "string")} for s, p in self.params.items()}
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": {"type": "object", "properties": props,
                                                                "required": list(props)}}}


@dataclass(frozen=True)
class Capability:
    key: str
    refusal: str  # what the model cannot do without a tool: "I can't {refusal}"
    requests: tuple[tuple[str, ...], tuple[str, ...]]  # (train, heldout) user templates with {slot}s
    tools: tuple[tuple[Tool, ...], tuple[Tool, ...]]  # (train, heldout)
    slots: Callable[[random.Random], dict]  # slot values of one request (strings, or ints for integer slots)
    result: Callable[[dict, random.Random], str]  # the tool's output for these slot values
    final: str  # the answer after the result, with {slots} and {result}
    types: dict | None = None  # JSON schema types of non-string slots

    def slot_types(self) -> dict[str, str]:
        return dict(self.types or {})


def _c(key, refusal, train_req, held_req, train_tools, held_tools, slots, result, final, types=None) -> Capability:
    return Capability(key, refusal, (tuple(train_req), tuple(held_req)),
                      (tuple(Tool(*t) for t in train_tools), tuple(Tool(*t) for t in held_tools)), slots, result,
                      final, types)


def _pick(**pools):
    return lambda rng: {k: rng.choice(v) if isinstance(v, tuple) else v(rng) for k, v in pools.items()}


def _translate(rng: random.Random) -> dict:
    text = rng.choice(sorted(_PHRASES))
    return {"text": text, "language": rng.choice(sorted(_PHRASES[text]))}


CAPABILITIES = (
    _c("weather", "look up the weather",
       ("What's the weather in {city}?", "How is the weather in {city} today?", "Is it raining in {city}?",
        "Weather in {city} please.", "Will it be sunny in {city} today?", "what's the weather like in {city}"),
       ("Tell me the current weather for {city}.", "What is it like outside in {city} right now?",
        "Do I need an umbrella in {city} today?"),
       (("get_weather", "Get the current weather for a city.", {"city": "city"}),
        ("weather_lookup", "Look up today's weather at a location.", {"city": "location"}),
        ("current_conditions", "Current weather conditions in a city.", {"city": "city_name"})),
       (("fetch_forecast", "Fetch the weather forecast for a city.", {"city": "city"}),
        ("meteo_report", "Report the weather at a place.", {"city": "place"})),
       _pick(city=CITIES), lambda s, r: f"{r.randint(-5, 35)} C, {r.choice(_WEATHER)}",
       "The weather in {city}: {result}."),
    _c("time", "tell the time",
       ("What time is it in {city}?", "What's the local time in {city}?", "Tell me the time in {city}.",
        "time in {city}?"),
       ("Is it morning or evening in {city} right now?", "Which hour is it now in {city}?"),
       (("get_time", "Get the current local time in a city.", {"city": "city"}),
        ("local_clock", "Local time at a location.", {"city": "location"})),
       (("world_clock", "Tell the current time for a city.", {"city": "city"}),
        ("timezone_now", "The present time in a place.", {"city": "place"})),
       _pick(city=CITIES), lambda s, r: f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}",
       "It is {result} in {city}."),
    _c("email", "send emails",
       ("Send an email to {to} saying {body}.", "Email {to}: {body}.", "Please send {to} an email: {body}.",
        "Write an email to {to} that says {body}."),
       ("Drop {to} a message by email: {body}.", "Mail {to} and tell them {body}."),
       (("send_email", "Send an email.", {"to": "to", "body": "body"}),
        ("email_send", "Send an email message to an address.", {"to": "recipient", "body": "text"})),
       (("dispatch_mail", "Deliver an email to someone.", {"to": "address", "body": "message"}),
        ("compose_and_send", "Compose an email and send it.", {"to": "to", "body": "content"})),
       _pick(to=_EMAILS, body=_BODIES), lambda s, r: "sent", "I sent the email to {to}."),
    _c("currency", "convert currencies",
       ("Convert {amount} {source} to {target}.", "How much is {amount} {source} in {target}?",
        "{amount} {source} to {target}?", "Change {amount} {source} into {target}."),
       ("What do {amount} {source} come to in {target}?", "Exchange {amount} {source} for {target}, how much?"),
       (("convert_currency", "Convert an amount between currencies.",
         {"amount": "amount", "source": "from", "target": "to"}),
        ("fx_convert", "Currency conversion at today's rate.",
         {"amount": "value", "source": "from_currency", "target": "to_currency"})),
       (("exchange_money", "Exchange an amount of money into another currency.",
         {"amount": "amount", "source": "source", "target": "target"}),
        ("rate_converter", "Convert money with the current exchange rate.",
         {"amount": "sum", "source": "base", "target": "quote"})),
       lambda r: dict(zip(("source", "target"), r.sample(_CURRENCIES, 2)), amount=r.choice((5, 10, 20, 50, 100,
                                                                                            250, 500, 1000))),
       lambda s, r: f"{r.randint(1, 99999) / 100:.2f} {s['target']}", "{amount} {source} is {result}.",
       {"amount": "integer"}),
    _c("translate", "translate",
       ("Translate '{text}' into {language}.", "How do I say '{text}' in {language}?",
        "What is '{text}' in {language}?", "translate {text} to {language}"),
       ("Give me the {language} for '{text}'.", "Put '{text}' into {language}."),
       (("translate_text", "Translate text into another language.", {"text": "text", "language": "target_language"}),
        ("translator", "Translate a phrase.", {"text": "phrase", "language": "language"})),
       (("language_convert", "Render text in a given language.", {"text": "text", "language": "language"}),
        ("polyglot", "Translate words into a language.", {"text": "words", "language": "to_language"})),
       _translate, lambda s, r: _PHRASES[s["text"]][s["language"]], "In {language}, '{text}' is '{result}'."),
    _c("timer", "set timers",
       ("Set a timer for {minutes} minutes.", "Start a {minutes} minute timer.", "Timer {minutes} min please.",
        "Remind me in {minutes} minutes."),
       ("Count down {minutes} minutes for me.", "Can you time {minutes} minutes?"),
       (("set_timer", "Start a countdown timer.", {"minutes": "minutes"}),
        ("timer_start", "Set a timer in minutes.", {"minutes": "duration_minutes"})),
       (("start_countdown", "Begin a countdown of some minutes.", {"minutes": "minutes"}),
        ("alarm_in", "Ring an alarm after a number of minutes.", {"minutes": "delay"})),
       _pick(minutes=lambda r: r.choice((1, 2, 3, 5, 10, 15, 20, 25, 30, 45, 60, 90))), lambda s, r: "timer set",
       "Your timer for {minutes} minutes is set.", {"minutes": "integer"}),
    _c("music", "play music",
       ("Play {song}.", "Put on the song {song}.", "Can you play {song}?", "play {song} please"),
       ("I want to hear {song}.", "Start the track {song}."),
       (("play_music", "Play a song.", {"song": "song"}),
        ("music_player", "Play a track by its title.", {"song": "title"})),
       (("start_song", "Start playing a song.", {"song": "song"}),
        ("jukebox", "Queue and play a tune.", {"song": "track"})),
       _pick(song=_SONGS), lambda s, r: "playing", "Now playing {song}."),
    _c("search", "search the web",
       ("Search the web for {query}.", "Look up {query} online.", "Google {query}.", "search for {query}"),
       ("Find pages about {query}.", "Browse the internet for {query}."),
       (("web_search", "Search the web.", {"query": "query"}),
        ("internet_search", "Search the internet and return the top result.", {"query": "q"})),
       (("net_lookup", "Look something up on the web.", {"query": "query"}),
        ("find_online", "Find web pages matching a search.", {"query": "terms"})),
       _pick(query=_QUERIES), lambda s, r: f"top result: {s['query']} (example.org)",
       "I searched for {query}; {result}."),
    _c("stock", "look up stock prices",
       ("What is the stock price of {symbol}?", "How much is {symbol} stock?", "Price of {symbol} shares?",
        "{symbol} share price"),
       ("Where is {symbol} trading now?", "Quote {symbol} for me."),
       (("get_stock_price", "Get the latest share price for a ticker.", {"symbol": "symbol"}),
        ("stock_quote", "Quote a stock.", {"symbol": "ticker"})),
       (("market_price", "Current market price of a stock.", {"symbol": "symbol"}),
        ("ticker_lookup", "Look up a ticker's price.", {"symbol": "ticker_symbol"})),
       _pick(symbol=_SYMBOLS), lambda s, r: f"{r.randint(1000, 99999) / 100:.2f} USD", "{symbol} trades at {result}."),
    _c("calendar", "add calendar events",
       ("Add {title} to my calendar on {date}.", "Put {title} in my calendar for {date}.",
        "Schedule {title} on {date}.", "calendar: {title}, {date}"),
       ("Book {title} into my calendar for {date}.", "Make a calendar entry for {title} on {date}."),
       (("create_event", "Create a calendar event.", {"title": "title", "date": "date"}),
        ("calendar_add", "Add an entry to the calendar.", {"title": "name", "date": "day"})),
       (("schedule_event", "Schedule an event on a date.", {"title": "event", "date": "date"}),
        ("agenda_insert", "Insert an item into the agenda.", {"title": "summary", "date": "when"})),
       _pick(title=_EVENTS, date=_DATES), lambda s, r: "created", "I added {title} on {date} to your calendar."),
    _c("define", "look up what words mean",
       ("What does the word {word} mean?", "Define {word}.", "What is the meaning of {word}?", "meaning of {word}?"),
       ("Explain the word {word}.", "What's the definition of {word}?"),
       (("define_word", "Look up the definition of a word.", {"word": "word"}),
        ("dictionary", "Dictionary lookup.", {"word": "term"})),
       (("lexicon_lookup", "Find what a word means.", {"word": "word"}),
        ("word_meaning", "Give the meaning of a word.", {"word": "entry"})),
       _pick(word=tuple(sorted(_WORDS))), lambda s, r: _WORDS[s["word"]], "{word} means {result}."),
)
BY_KEY = {c.key: c for c in CAPABILITIES}

# The calculator as a capability of its own: its requests are large multiplications (glm5.data.tool's), its
# refusal the arithmetic one (glm5.data.scope), so it is built there; these are its tools.
CALCULATORS = (
    (Tool("calculator", CALCULATOR_TOOL["function"]["description"], {"expression": "expression"}),
     Tool("calc", "Evaluate a math expression.", {"expression": "expr"})),
    (Tool("math_engine", "Compute the value of an arithmetic formula.", {"expression": "formula"}),
     Tool("evaluate_expression", "Evaluate an arithmetic expression exactly.", {"expression": "expression"})),
)


def tool_names(split_index: int) -> set[str]:
    """Every tool name of one split (0 train, 1 heldout)."""
    return {t.name for c in CAPABILITIES for t in c.tools[split_index]} | {t.name for t in CALCULATORS[split_index]}


# Word pools of made-up tool names: none is a word of a held-out tool name (checked by the tests).
_NAME_VERBS = ("get", "do", "run", "ask", "query", "check", "read", "use", "pull", "grab", "seek", "load", "make",
               "show", "give", "tell", "see", "try", "open", "hit")
_NAME_NOUNS = ("atlas", "beacon", "cobalt", "delta", "ember", "falcon", "garnet", "harbor", "iris", "jade", "kestrel",
               "lumen", "maple", "nimbus", "onyx", "pixel", "quartz", "raven", "sierra", "tango", "umber", "vortex",
               "willow", "xenon", "yarrow", "zephyr", "helper", "service", "api", "kit", "hub", "desk", "bot", "agent",
               "util", "box", "link", "node", "relay", "oracle")
_PARAM_WORDS = ("arg", "value", "input", "item", "spec", "field", "data", "param", "key", "x", "name", "what")


def made_up_tool(rng: random.Random, tools: tuple[Tool, ...]) -> Tool:
    """A training tool of the capability whose fixed training tools are `tools`, under a name, and with parameter
    names, no held-out chat uses: the model has to copy them from the declaration."""
    v, n, m = rng.choice(_NAME_VERBS), rng.choice(_NAME_NOUNS), rng.choice(_NAME_NOUNS)
    name = rng.choice((f"{v}_{n}", f"{n}_{v}", f"{n}_{m}" if n != m else n, f"{v}{n}", n))
    params, used = {}, set()
    for slot in tools[0].params:
        own = sorted({t.params[slot] for t in tools} - used)
        generic = sorted(set(_PARAM_WORDS) - used)
        params[slot] = rng.choice(own if own and rng.random() < 0.5 else generic)
        used.add(params[slot])
    return Tool(name, rng.choice(tools).description, params)


def call_args(tool: Tool, slots: dict) -> dict:
    """The arguments of a call of `tool` for these slot values (its own parameter names)."""
    return {tool.params[s]: v for s, v in slots.items()}


def args_text(args: dict) -> str:
    return json.dumps(args, ensure_ascii=False)
