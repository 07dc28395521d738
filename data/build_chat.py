"""Generate data/chat/{train,test}.jsonl: the small multilingual chat dataset of the default SFT run.

Usage (stdlib only; the output is byte-identical on every run):
    python data/build_chat.py --output data/chat

Every conversation is built from templates and word lists written for this repository (CC0), in the six languages
of the corpus. The tasks are ones a tiny model can learn in minutes and whose answers are exactly determined by the
question, so a trained model can be checked by string comparison: repeat a phrase, write a word in capitals,
continue a count, add two small numbers, name the day after or before a weekday, answer yes/no to "is this word an
animal?" and "is a greater than b?". Rows are `{"messages": [...], "language": ..., "tasks": [...]}` in the
`transformers` conversational format; about a third start with a system message and about 40% have two or three
user/assistant turns. The test rows are conversations that do not occur in train.
"""

import argparse
import json
import random
from pathlib import Path

SEED = 20250902  # the day Apertus was released
TRAIN_ROWS = 2400
TEST_ROWS = 300
LANGUAGES = ("en", "fr", "it", "es", "de", "rm")

# The same 30 nouns in every language; the first five are the animals of the yes/no task.
NOUNS = {
    "en": "bird cat dog horse cow house water tree mountain lake bread cheese train book school river snow sun moon "
    "flower apple milk village city window table door street bridge forest",
    "fr": "oiseau chat chien cheval vache maison eau arbre montagne lac pain fromage train livre école rivière neige "
    "soleil lune fleur pomme lait village ville fenêtre table porte rue pont forêt",
    "it": "uccello gatto cane cavallo mucca casa acqua albero montagna lago pane formaggio treno libro scuola fiume "
    "neve sole luna fiore mela latte villaggio città finestra tavolo porta strada ponte foresta",
    "es": "pájaro gato perro caballo vaca casa agua árbol montaña lago pan queso tren libro escuela río nieve sol "
    "luna flor manzana leche pueblo ciudad ventana mesa puerta calle puente bosque",
    "de": "Vogel Katze Hund Pferd Kuh Haus Wasser Baum Berg See Brot Käse Zug Buch Schule Fluss Schnee Sonne Mond "
    "Blume Apfel Milch Dorf Stadt Fenster Tisch Tür Strasse Brücke Wald",
    "rm": "utschè giat chaun chaval vatga chasa aua planta muntogna lai paun chaschiel tren cudesch scola flum naiv "
    "sulegl glina flur mail latg vitg citad fanestra maisa porta via punt guaud",
}
NUM_ANIMALS = 5

WEEKDAYS = {
    "en": "Monday Tuesday Wednesday Thursday Friday Saturday Sunday",
    "fr": "lundi mardi mercredi jeudi vendredi samedi dimanche",
    "it": "lunedì martedì mercoledì giovedì venerdì sabato domenica",
    "es": "lunes martes miércoles jueves viernes sábado domingo",
    "de": "Montag Dienstag Mittwoch Donnerstag Freitag Samstag Sonntag",
    "rm": "glindesdi mardi mesemna gievgia venderdi sonda dumengia",
}

SYSTEM_PROMPTS = {
    "en": ("You are a helpful assistant. Answer briefly.", "Reply as briefly as possible."),
    "fr": ("Tu es un assistant serviable. Réponds brièvement.", "Réponds le plus brièvement possible."),
    "it": ("Sei un assistente disponibile. Rispondi in breve.", "Rispondi nel modo più breve possibile."),
    "es": ("Eres un asistente útil. Responde brevemente.", "Responde de la forma más breve posible."),
    "de": ("Du bist ein hilfreicher Assistent. Antworte kurz.", "Antworte so kurz wie möglich."),
    "rm": ("Ti es in assistent gidaivel. Respunda curt.", "Respunda uschè curt sco pussaivel."),
}

# task -> language -> (question templates, answer template). {x}: the input, {y}: the expected output.
TEMPLATES = {
    "echo": {
        "en": (("Repeat after me: {x}", "Say exactly this: {x}"), "{y}"),
        "fr": (("Répète après moi : {x}", "Dis exactement ceci : {x}"), "{y}"),
        "it": (("Ripeti dopo di me: {x}", "Di' esattamente questo: {x}"), "{y}"),
        "es": (("Repite después de mí: {x}", "Di exactamente esto: {x}"), "{y}"),
        "de": (("Sprich mir nach: {x}", "Sag genau das: {x}"), "{y}"),
        "rm": (("Repeta suenter mai: {x}", "Di precis quai: {x}"), "{y}"),
    },
    "uppercase": {
        "en": (("Write this word in capital letters: {x}", "Capitalise every letter: {x}"), "{y}"),
        "fr": (("Écris ce mot en majuscules : {x}", "Mets ce mot en majuscules : {x}"), "{y}"),
        "it": (("Scrivi questa parola in maiuscolo: {x}", "Metti in maiuscolo: {x}"), "{y}"),
        "es": (("Escribe esta palabra en mayúsculas: {x}", "Pon en mayúsculas: {x}"), "{y}"),
        "de": (("Schreib dieses Wort in Grossbuchstaben: {x}", "Nur Grossbuchstaben bitte: {x}"), "{y}"),
        "rm": (("Scriva quest pled cun bustabs gronds: {x}", "Mo bustabs gronds: {x}"), "{y}"),
    },
    "count": {
        "en": (("Continue the count: {x}", "What are the next three numbers? {x}"), "{y}"),
        "fr": (("Continue le compte : {x}", "Quels sont les trois nombres suivants ? {x}"), "{y}"),
        "it": (("Continua a contare: {x}", "Quali sono i tre numeri successivi? {x}"), "{y}"),
        "es": (("Sigue contando: {x}", "¿Cuáles son los tres números siguientes? {x}"), "{y}"),
        "de": (("Zähl weiter: {x}", "Welche drei Zahlen kommen als Nächstes? {x}"), "{y}"),
        "rm": (("Cuntinuescha a dumbrar: {x}", "Tge trais numers vegnan suenter? {x}"), "{y}"),
    },
    "add": {
        "en": (("What is {x}?", "Compute {x}."), "{x} = {y}."),
        "fr": (("Combien font {x} ?", "Calcule {x}."), "{x} = {y}."),
        "it": (("Quanto fa {x}?", "Calcola {x}."), "{x} = {y}."),
        "es": (("¿Cuánto es {x}?", "Calcula {x}."), "{x} = {y}."),
        "de": (("Was ist {x}?", "Rechne {x}."), "{x} = {y}."),
        "rm": (("Quant fa {x}?", "Quinta {x}."), "{x} = {y}."),
    },
    "day_after": {
        "en": (("Which day comes after {x}?", "What is the day after {x}?"), "After {x} comes {y}."),
        "fr": (("Quel jour vient après {x} ?", "Quel est le jour après {x} ?"), "Après {x} vient {y}."),
        "it": (("Che giorno viene dopo {x}?", "Qual è il giorno dopo {x}?"), "Dopo {x} viene {y}."),
        "es": (
            ("¿Qué día viene después del {x}?", "¿Cuál es el día después del {x}?"),
            "Después del {x} viene el {y}.",
        ),
        "de": (("Welcher Tag kommt nach {x}?", "Was ist der Tag nach {x}?"), "Nach {x} kommt {y}."),
        "rm": (("Tge di vegn suenter {x}?", "Tge di è suenter {x}?"), "Suenter {x} vegn {y}."),
    },
    "day_before": {
        "en": (("Which day comes before {x}?", "What is the day before {x}?"), "Before {x} comes {y}."),
        "fr": (("Quel jour vient avant {x} ?", "Quel est le jour avant {x} ?"), "Avant {x} vient {y}."),
        "it": (("Che giorno viene prima di {x}?", "Qual è il giorno prima di {x}?"), "Prima di {x} viene {y}."),
        "es": (("¿Qué día viene antes del {x}?", "¿Cuál es el día antes del {x}?"), "Antes del {x} viene el {y}."),
        "de": (("Welcher Tag kommt vor {x}?", "Was ist der Tag vor {x}?"), "Vor {x} kommt {y}."),
        "rm": (("Tge di vegn avant {x}?", "Tge di è avant {x}?"), "Avant {x} vegn {y}."),
    },
    "is_animal": {
        "en": (("Is «{x}» an animal? Answer yes or no.", "Yes or no: is «{x}» an animal?"), "{y}"),
        "fr": (
            ("« {x} » est-il un animal ? Réponds par oui ou par non.", "Oui ou non : « {x} » est-il un animal ?"),
            "{y}",
        ),
        "it": (("«{x}» è un animale? Rispondi sì o no.", "Sì o no: «{x}» è un animale?"), "{y}"),
        "es": (("¿«{x}» es un animal? Responde sí o no.", "Sí o no: ¿«{x}» es un animal?"), "{y}"),
        "de": (("Ist «{x}» ein Tier? Antworte mit Ja oder Nein.", "Ja oder Nein: Ist «{x}» ein Tier?"), "{y}"),
        "rm": (("È «{x}» in animal? Respunda cun gea u na.", "Gea u na: È «{x}» in animal?"), "{y}"),
    },
    "greater": {
        "en": (("Is {x}? Answer yes or no.", "Yes or no: is {x}?"), "{y}"),
        "fr": (("Est-ce que {x} ? Réponds par oui ou par non.", "Oui ou non : est-ce que {x} ?"), "{y}"),
        "it": (("È vero che {x}? Rispondi sì o no.", "Sì o no: è vero che {x}?"), "{y}"),
        "es": (("¿Es cierto que {x}? Responde sí o no.", "Sí o no: ¿es cierto que {x}?"), "{y}"),
        "de": (("Stimmt es, dass {x}? Antworte mit Ja oder Nein.", "Ja oder Nein: Stimmt es, dass {x}?"), "{y}"),
        "rm": (("Èsi vair che {x}? Respunda cun gea u na.", "Gea u na: èsi vair che {x}?"), "{y}"),
    },
}
YES_NO = {
    "en": ("Yes.", "No."),
    "fr": ("Oui.", "Non."),
    "it": ("Sì.", "No."),
    "es": ("Sí.", "No."),
    "de": ("Ja.", "Nein."),
    "rm": ("Gea.", "Na."),
}
GREATER_THAN = {  # "{a} is greater than {b}" inside the question templates of "greater"
    "en": "{a} greater than {b}",
    "fr": "{a} est plus grand que {b}",
    "it": "{a} è maggiore di {b}",
    "es": "{a} es mayor que {b}",
    "de": "{a} grösser als {b} ist",
    "rm": "{a} è pli grond che {b}",
}


def task_input_output(task: str, language: str, rng: random.Random) -> tuple[str, str]:
    """(x, y) of one instance of `task`: what goes into the question and the exact expected answer."""
    nouns = NOUNS[language].split()
    if task == "echo":
        phrase = " ".join(rng.sample(nouns, rng.randint(2, 4)))
        return phrase, phrase
    if task == "uppercase":
        word = rng.choice(nouns)
        return word, word.upper()
    if task == "count":
        step = rng.choice((1, 1, 2, 5, 10))
        start = rng.randint(0, 20) * step
        numbers = [start + step * i for i in range(6)]
        return ", ".join(map(str, numbers[:3])), ", ".join(map(str, numbers[3:]))
    if task == "add":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return f"{a} + {b}", str(a + b)
    if task in ("day_after", "day_before"):
        days = WEEKDAYS[language].split()
        index = rng.randrange(7)
        return days[index], days[(index + (1 if task == "day_after" else -1)) % 7]
    yes, no = YES_NO[language]
    if task == "is_animal":
        index = rng.randrange(len(nouns))
        # Half the questions are about animals, so that "yes" and "no" are equally frequent.
        if rng.random() < 0.5:
            index = rng.randrange(NUM_ANIMALS)
        return nouns[index], yes if index < NUM_ANIMALS else no
    if task == "greater":
        a, b = rng.sample(range(0, 100), 2)
        return GREATER_THAN[language].format(a=a, b=b), yes if a > b else no
    raise ValueError(f"unknown task {task}")


def conversation(rng: random.Random) -> dict:
    """One row: a language, optionally a system message, then one to three question/answer turns."""
    language = rng.choice(LANGUAGES)
    messages = []
    if rng.random() < 0.35:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS[language])})
    tasks = rng.choices(list(TEMPLATES), k=1 if rng.random() < 0.6 else rng.randint(2, 3))
    for task in tasks:
        questions, answer = TEMPLATES[task][language]
        x, y = task_input_output(task, language, rng)
        messages.append({"role": "user", "content": rng.choice(questions).format(x=x)})
        messages.append({"role": "assistant", "content": answer.format(x=x, y=y)})
    return {"messages": messages, "language": language, "tasks": tasks}


def build(train_rows: int = TRAIN_ROWS, test_rows: int = TEST_ROWS, seed: int = SEED) -> tuple[list, list]:
    """(train, test) rows: distinct conversations; none of the test conversations occurs in train."""
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < train_rows + test_rows:
        row = conversation(rng)
        key = json.dumps(row["messages"], ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows[:train_rows], rows[train_rows:]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "chat")
    parser.add_argument("--train-rows", type=int, default=TRAIN_ROWS)
    parser.add_argument("--test-rows", type=int, default=TEST_ROWS)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    train, test = build(args.train_rows, args.test_rows, args.seed)
    args.output.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.output / "train.jsonl", train)
    write_jsonl(args.output / "test.jsonl", test)
    print(f"Wrote {len(train)} train and {len(test)} test conversations to {args.output}.")


if __name__ == "__main__":
    main()
