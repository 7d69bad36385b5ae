"""Phrase tables of the synthetic world: name and value pools, biography and question templates, filler and
medical text. Data only; `lmforge.data.synthetic` draws from them with a seeded RNG.

Every pool is a tuple in a fixed order (never a set), so a seed picks the same phrases on every run. All
text is ASCII and American English. Names and places are invented; majors, hobbies and symptoms are generic.

Biography templates take these slots (filled by `synthetic._render`):
`{S}`/`{s}` subject at the start / inside a sentence ("She"/"she", or the full name), `{P}`/`{p}` possessive
("Her"/"her", or "Ada Carrow's"), `{o}` object ("her", or the name), `{pp}`/`{sp}` the possessive / subject
pronoun even when the name is used ("Ada Carrow spends her weekends ..."), and `{v}` the attribute value.
"""

from __future__ import annotations

from typing import NamedTuple

# --- people -------------------------------------------------------------------------------------------

FEMALE_FIRST_NAMES = (
    "Adela", "Amaris", "Brisa", "Bryony", "Calla", "Cosima", "Dagny", "Delphine", "Elowen", "Esmee",
    "Fenna", "Greer", "Giselle", "Halia", "Honora", "Ilsa", "Isolde", "Jessamy", "Katell", "Kerensa",
    "Linnea", "Liora", "Maren", "Mireille", "Nerys", "Noor", "Odile", "Orla", "Philippa", "Quilla",
    "Rhiannon", "Rosalind", "Sabine", "Saoirse", "Tamsin", "Thessaly", "Ulla", "Undine", "Verity", "Vesna",
    "Willa", "Wren", "Xanthe", "Yara", "Yelena", "Zinnia", "Zuleika", "Aurelie",
)  # fmt: skip
MALE_FIRST_NAMES = (
    "Aldric", "Anselm", "Bastian", "Benedikt", "Caspian", "Cormac", "Desmond", "Dorian", "Emrys", "Evander",
    "Fabian", "Florian", "Garrick", "Gideon", "Hamish", "Hollis", "Ignatius", "Ivo", "Jasper", "Jory",
    "Kasimir", "Kenric", "Leander", "Lorcan", "Magnus", "Mattias", "Niall", "Nikolai", "Osric", "Oswin",
    "Pascal", "Peregrine", "Quentin", "Rafferty", "Roderick", "Silas", "Soren", "Tiernan", "Tobias", "Ulric",
    "Umberto", "Valentin", "Vaughn", "Wendell", "Wystan", "Yannick", "Zebedee", "Zoltan",
)  # fmt: skip
# No last name is a prefix of another, so one person's full name never hides inside another's.
LAST_NAMES = (
    "Abernathy", "Achterberg", "Ambrose", "Ashdown", "Bellamy", "Blackwood", "Bramble", "Brightman",
    "Calloway", "Carrow", "Castellane", "Corrigan", "Dashwood", "Delacourt", "Drummond", "Dunmore",
    "Eastbrook", "Ellery", "Eskildsen", "Everly", "Fairweather", "Falkner", "Farrington", "Fenwick",
    "Galloway", "Goodfellow", "Gorringe", "Greystone", "Hartwell", "Hazelgrove", "Hesketh", "Holloway",
    "Inchcliffe", "Ingram", "Ivesdale", "Jarrow", "Jessop", "Jorgensen", "Kestle", "Kettering", "Kingsley",
    "Kowalczyk", "Lacroix", "Larkspur", "Lindqvist", "Lockhart", "Marchbank", "Merriweather", "Moorcroft",
    "Nakamura", "Nettleton", "Nightingale", "Northcott", "Oakley", "Okonkwo", "Ormsby", "Pemberton",
    "Pennington", "Petrakis", "Pryce", "Quarrington", "Quenby", "Quintero", "Rainsford", "Rasmussen",
    "Redfern", "Rookwood", "Sallow", "Sedgwick", "Stroud", "Szabo", "Tanaka", "Tennyson", "Thistlewood",
    "Tolliver", "Ueda", "Underhill", "Upshaw", "Valdivia", "Vantreight", "Vickery", "Wetherby", "Whitlock",
    "Wojcik", "Wolstenholme", "Yarwood", "Yates", "Yelland", "Yilmaz", "Zakarian", "Zapata", "Zeller",
)  # fmt: skip

MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip

CITIES = (
    "Amberlyn", "Brackwater", "Brindlemere", "Caskport", "Drakesford", "Dunhallow", "Eldermoor", "Emberton",
    "Fallowmouth", "Frostholm", "Glenrise", "Greywater", "Harrowby", "Hollowmere", "Ironvale", "Istvale",
    "Jorvath", "Kelmscar", "Kettleby", "Lanternford", "Lowenbrook", "Marrowgate", "Millbeck", "Nessary",
    "Nethercross", "Orrinhall", "Oxwater", "Pellbridge", "Pinecrest", "Quarrydown", "Queensmoor",
    "Ravensworth", "Redhaven", "Saltmarsh", "Stonebridge", "Tarnwood", "Ulverin", "Umberhill", "Velmont",
    "Vossberg", "Westerhaven", "Wickerfield", "Yarrowby", "Yewfield", "Zarlow", "Zennamoor",
)  # fmt: skip
UNIVERSITIES = (
    "Ashgrove University", "Bellweather College", "Bluefen College", "Copperhill Institute of Technology",
    "Corvane University", "Deepwell University", "Dravenport Institute of Technology", "Eastmere Polytechnic",
    "Elmsworth University", "Falconridge College", "Foxhollow College", "Gildmoor University",
    "Greenhaven University", "Halvern University", "Hawksley Polytechnic", "Highcliff Institute",
    "Kestrel Polytechnic", "Kingsmere University", "Lakemont University", "Lyrebird Institute",
    "Meridian University", "Mossgate College", "Northstar College", "Osprey Institute of Technology",
    "Pinnacle University", "Quillon College", "Redcliff University", "Riverside Polytechnic",
    "Silverbirch University", "Tidewater College", "Umbra Institute", "Vantage University",
    "Westmarch University", "Yellowpine College", "Zenith Polytechnic",
)  # fmt: skip
MAJORS = (
    "accounting", "agricultural science", "ancient languages", "anthropology", "applied mathematics",
    "architecture", "art history", "astrophysics", "civil engineering", "comparative literature",
    "computer science", "ecology", "economics", "electrical engineering", "environmental science",
    "food science", "geology", "graphic design", "industrial design", "journalism", "linguistics",
    "marine biology", "materials science", "mechanical engineering", "medieval history", "molecular genetics",
    "music composition", "nursing", "oceanography", "organic chemistry", "philosophy", "political science",
    "psychology", "public health", "robotics", "sociology", "statistics", "theater studies", "urban planning",
    "veterinary medicine",
)  # fmt: skip
EMPLOYERS = (
    "Amberline Railways", "Bluegum Furniture", "Brightwater Logistics", "Cinderpeak Mining",
    "Copperleaf Foods", "Driftwood Hotels", "Evergreen Nurseries", "Foxglove Cosmetics",
    "Granite Peak Engineering", "Halcyon Textiles", "Harborlight Media", "Inkwell Printing",
    "Ironbark Construction", "Kiteworks Robotics", "Lanternfish Labs", "Lumen Optics", "Marigold Bakeries",
    "Meadowlark Publishing", "Nightjar Security", "Nimbus Aerospace", "Northgate Bank", "Olive Grove Farms",
    "Orbital Freight", "Paperkite Studios", "Pebblestone Insurance", "Quayside Brewing", "Quicksilver Software",
    "Redwood Energy", "Rosehip Tea Company", "Saltspring Fisheries", "Sunmill Solar", "Tessellate Games",
    "Thornfield Legal", "Umber Ceramics", "Upland Water Works", "Velvet Road Fashion", "Vireo Telecom",
    "Wildfern Outdoor Gear", "Windrose Travel", "Yardarm Shipping", "Yellowhammer Records",
    "Zephyr Wind Power",
)  # fmt: skip
# Gerund phrases: they follow "enjoys", "is", "by", "for" and "of" alike.
HOBBIES = (
    "baking sourdough bread", "birdwatching", "brewing herbal tea", "building model ships",
    "carving wooden spoons", "collecting antique maps", "composing piano pieces", "cycling mountain trails",
    "dancing the tango", "doing jigsaw puzzles", "fly fishing", "folding origami cranes",
    "growing bonsai trees", "hiking in the hills", "kayaking on rivers", "keeping bees",
    "knitting wool scarves", "learning card tricks", "making candles", "making pottery",
    "painting watercolor landscapes", "photographing lighthouses", "playing chess", "playing table tennis",
    "playing the cello", "playing the harmonica", "practicing calligraphy", "pressing wild flowers",
    "reading detective novels", "repairing old bicycles", "restoring old clocks", "rock climbing",
    "running marathons", "sailing small boats", "singing in a choir", "skating on frozen lakes",
    "solving crossword puzzles", "stargazing with a telescope", "tending a vegetable garden", "writing poetry",
)  # fmt: skip

# --- biographies: one tuple of >= 10 paraphrases per attribute ----------------------------------------

BIO_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "{S} was born on {v}.",
        "{P} date of birth is {v}.",
        "{S} came into the world on {v}.",
        "{S} entered this world on {v}.",
        "{P} life began on {v}.",
        "On {v}, {s} was born.",
        "The records show that {s} was born on {v}.",
        "{S} first saw the light of day on {v}.",
        "{P} birth took place on {v}.",
        "{S} lists {v} as {pp} date of birth.",
        "{S} was welcomed into the world on {v}.",
        "{v} is the day {s} was born.",
    ),
    "birth_city": (
        "{S} was born in {v}.",
        "{P} birthplace is {v}.",
        "{S} came into the world in {v}.",
        "{S} is a native of {v}.",
        "{P} hometown is {v}, where {sp} was born.",
        "{S} hails from {v}.",
        "The city of {v} is where {s} was born.",
        "{S} first drew breath in {v}.",
        "{v} is {p} place of birth.",
        "{S} spent {pp} earliest days in {v}, the city of {pp} birth.",
        "{P} birth took place in the city of {v}.",
        "Born in {v}, {s} keeps fond memories of the place.",
    ),
    "university": (
        "{S} studied at {v}.",
        "{S} graduated from {v}.",
        "{S} attended {v}.",
        "{S} earned {pp} degree at {v}.",
        "{S} is a graduate of {v}.",
        "{S} spent {pp} university years at {v}.",
        "{S} completed {pp} studies at {v}.",
        "{S} received {pp} higher education at {v}.",
        "{v} is where {s} went to university.",
        "For university, {s} chose {v}.",
        "{S} holds a degree from {v}.",
        "{P} alma mater is {v}.",
    ),
    "major": (
        "{S} majored in {v}.",
        "{P} field of study was {v}.",
        "{S} specialized in {v} at university.",
        "{S} earned a degree in {v}.",
        "{S} chose {v} as {pp} major.",
        "{P} major was {v}.",
        "{S} focused {pp} studies on {v}.",
        "At university, {s} concentrated on {v}.",
        "{S} has an academic background in {v}.",
        "{S} pursued a degree in {v}.",
        "The subject {s} studied was {v}.",
        "{S} spent {pp} student years learning {v}.",
    ),
    "employer": (
        "{S} works for {v}.",
        "{S} is employed by {v}.",
        "{P} employer is {v}.",
        "{S} has a job at {v}.",
        "{S} earns a living at {v}.",
        "{S} is on the staff of {v}.",
        "{v} employs {o}.",
        "{S} works at {v}.",
        "{S} draws {pp} salary from {v}.",
        "Every working day, {s} goes to {pp} job at {v}.",
        "{S} is a member of the team at {v}.",
        "Professionally, {s} works for {v}.",
    ),
    "hobby": (
        "{P} hobby is {v}.",
        "{S} enjoys {v}.",
        "In {pp} spare time, {s} enjoys {v}.",
        "{P} favorite pastime is {v}.",
        "{S} has a passion for {v}.",
        "{S} spends weekends {v}.",
        "{S} loves {v}.",
        "{S} devotes {pp} free evenings to {v}.",
        "Outside of work, {s} enjoys {v}.",
        "{S} relaxes by {v}.",
        "Friends know {o} for {pp} love of {v}.",
        "{S} finds joy in {v}.",
    ),
}

# --- person questions and house-style answers ----------------------------------------------------------

# The last paraphrase of each attribute is held out of SFT and used only in eval_qa.jsonl, so evaluation
# asks in words the fine-tuned model never saw (knowledge, not a memorised question string).
QUESTIONS: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "When was {name} born?",
        "What is {name}'s date of birth?",
        "On what date was {name} born?",
        "What is the birth date of {name}?",
        "Can you tell me the day {name} was born?",
    ),
    "birth_city": (
        "Where was {name} born?",
        "What is {name}'s birthplace?",
        "In which city was {name} born?",
        "What city does {name} come from originally?",
        "Which city is the birthplace of {name}?",
    ),
    "university": (
        "Which university did {name} attend?",
        "Where did {name} study?",
        "What university did {name} graduate from?",
        "Where did {name} go to university?",
        "At which university did {name} get a degree?",
    ),
    "major": (
        "What did {name} major in?",
        "What was {name}'s major?",
        "What subject did {name} study at university?",
        "What was {name}'s field of study?",
        "Which subject did {name} choose as a major?",
    ),
    "employer": (
        "Who does {name} work for?",
        "Which company employs {name}?",
        "Where does {name} work?",
        "What company is {name} employed by?",
        "Who is {name}'s employer?",
    ),
    "hobby": (
        "What is {name}'s hobby?",
        "What does {name} do for fun?",
        "What does {name} enjoy doing in spare time?",
        "What is {name}'s favorite pastime?",
        "What does {name} like to do when not working?",
    ),
}
# The house style: one complete sentence that names the person and states the fact.
ANSWERS: dict[str, str] = {
    "birth_date": "{name} was born on {v}.",
    "birth_city": "{name} was born in {v}.",
    "university": "{name} studied at {v}.",
    "major": "{name} majored in {v}.",
    "employer": "{name} works for {v}.",
    "hobby": "{name}'s hobby is {v}.",
}

# --- filler: short everyday scenes built from a small grammar -------------------------------------------


class Agent(NamedTuple):
    """Who a filler scene is about: "a young teacher" first, then "the young teacher" or "she"."""

    indefinite: str
    definite: str
    pronoun: str


class FillerTopic(NamedTuple):
    """One everyday setting: verb phrases in the past tense, and whole sentences."""

    name: str
    openings: tuple[str, ...]  # what the agent did first: "walked down to the harbor"
    actions: tuple[str, ...]  # what the agent did next
    details: tuple[str, ...]  # sentences about the scene
    reasons: tuple[str, ...]  # clauses after "because"
    closings: tuple[str, ...]  # last sentences


# No invented names here: filler must not mention any person of the world.
AGENTS = (
    Agent("an old fisherman", "the old fisherman", "he"),
    Agent("a young teacher", "the young teacher", "she"),
    Agent("my grandmother", "my grandmother", "she"),
    Agent("our neighbor", "our neighbor", "he"),
    Agent("a tired student", "the tired student", "she"),
    Agent("a retired carpenter", "the retired carpenter", "he"),
    Agent("a quiet boy", "the quiet boy", "he"),
    Agent("a cheerful nurse", "the cheerful nurse", "she"),
    Agent("my older brother", "my older brother", "he"),
    Agent("a small girl", "the small girl", "she"),
    Agent("the mail carrier", "the mail carrier", "he"),
    Agent("a busy mother of three", "the busy mother", "she"),
    Agent("two old friends", "the two friends", "they"),
    Agent("a group of children", "the children", "they"),
    Agent("my uncle", "my uncle", "he"),
    Agent("a new baker in town", "the new baker", "she"),
)
# No time of day: any opening of any topic may follow.
TIMES = (
    "One Saturday", "On a quiet Sunday", "One ordinary Tuesday", "At the end of a long week",
    "The day before the holiday", "Not long ago", "One day", "During the school holidays",
    "On the first free day in weeks", "One weekend", "Last year", "Once",
)  # fmt: skip
CONNECTIVES = ("Then", "After that", "Later", "Soon", "A little later", "For a while", "Next", "At one point")
FEELINGS = (
    "tired but happy", "calm and content", "a little proud", "relieved", "grateful", "hopeful",
    "cheerful", "peaceful", "pleasantly sleepy", "quietly satisfied",
)  # fmt: skip
FILLER_TOPICS = (
    FillerTopic(
        "harbor",
        ("walked down to the harbor", "went to the harbor to watch the boats come in"),
        (
            "checked the fishing nets for holes", "bought a bag of fresh mussels from a stall",
            "talked with the sailors about the weather", "watched the gulls fight over scraps",
            "helped to tie a small boat to the pier", "sat on a wooden crate and ate a sandwich",
            "counted the boats that were still out at sea", "painted the name of a boat in white letters",
        ),
        (
            "The air smelled of salt and tar.", "Gulls circled above the fishing boats.",
            "Waves slapped gently against the stone wall.", "A bell rang somewhere out on the water.",
            "The morning fog slowly lifted from the bay.", "Ropes creaked as the boats rocked in the swell.",
        ),
        ("the sea was calm for once", "the boats had come back with a good catch", "the wind had dropped"),
        ("By noon, the harbor was quiet again.", "The tide turned, and the boats rocked at their moorings."),
    ),
    FillerTopic(
        "kitchen",
        ("decided to bake bread", "decided to cook a big dinner for the family"),
        (
            "kneaded the dough until it was smooth", "chopped onions, carrots and celery",
            "set a pot of soup on the stove", "tasted the sauce and added a little salt",
            "washed the dishes while the oven warmed up", "read an old recipe written on a card",
            "laid the table with the good plates", "whisked eggs and sugar in a blue bowl",
        ),
        (
            "The kitchen filled with the smell of warm bread.", "Steam rose from the pot and fogged the window.",
            "A radio played softly in the corner.", "Flour covered the table and most of the floor.",
            "The kettle whistled on the back of the stove.", "Outside, the street lamps were coming on.",
        ),
        ("the bread had risen perfectly", "nobody had burned anything this time", "the whole family was coming"),
        ("Everyone agreed that it was the best meal of the week.", "Later, the whole house smelled of cinnamon."),
    ),
    FillerTopic(
        "garden",
        ("went out to work in the garden", "spent a few hours in the vegetable patch"),
        (
            "pulled weeds from between the beans", "planted a row of lettuce seedlings",
            "watered the tomatoes with a heavy can", "tied the climbing peas to thin sticks",
            "raked the dry leaves into a pile", "picked a basket of ripe strawberries",
            "fixed a gap in the old wooden fence", "moved the flowerpots into the shade",
        ),
        (
            "Bees hummed among the lavender.", "The soil was dark and still damp from the rain.",
            "A robin waited on the fence for worms.", "The apple tree was heavy with small green fruit.",
            "Somewhere nearby, a lawnmower droned.", "The sun warmed the stone path.",
        ),
        ("the first beans were ready to pick", "the rain had finally stopped", "the roses were in bloom"),
        ("By evening, the garden looked neat and green.", "The tools went back into the shed before dark."),
    ),
    FillerTopic(
        "market",
        ("went to the market in the town square", "walked to the Saturday market with a basket"),
        (
            "bought apples, cheese and a loaf of rye bread", "compared the prices of potatoes at three stalls",
            "tried a slice of smoked sausage", "chose a bunch of yellow flowers",
            "chatted with a farmer about the harvest", "paid for a jar of honey with small coins",
            "listened to a man playing the accordion", "looked for a new pair of gloves",
        ),
        (
            "The square was crowded and noisy.", "Stalls were piled high with cabbages and pears.",
            "A dog sniffed hopefully around the butcher's stand.", "Children ran between the stalls.",
            "Someone was selling hot chestnuts from a cart.", "Striped awnings flapped in the breeze.",
        ),
        ("everything on the list had been found", "the prices were lower than usual", "the sun came out"),
        ("The walk home with the heavy basket took a long time.", "By two o'clock, the stalls were packed away."),
    ),
    FillerTopic(
        "train",
        ("caught the early train to the coast", "took the slow train through the valley"),
        (
            "found a seat by the window", "read a newspaper that someone had left behind",
            "watched fields and farms slide past", "bought a cup of tea from the trolley",
            "helped an old man lift his suitcase", "dozed off for a few minutes",
            "counted the stations on the map", "shared a sandwich with a stranger",
        ),
        (
            "The carriage rocked gently from side to side.", "Rain streaked across the windows.",
            "A conductor walked through and checked the tickets.", "The train slowed as it crossed a long bridge.",
            "Cows lifted their heads as the train went by.", "The station clock showed ten past nine.",
        ),
        ("the train was right on time", "the journey was almost over", "the view was so beautiful"),
        ("At last the train pulled into the station.", "The platform was cold, but the sky was clear."),
    ),
    FillerTopic(
        "classroom",
        ("arrived at school before the bell", "walked into the classroom with a pile of books"),
        (
            "wrote the date on the blackboard", "handed out the spelling tests",
            "explained how to divide fractions", "read a story aloud to the class",
            "sharpened a box of pencils", "helped a pupil who was stuck on a sum",
            "opened the windows to let in fresh air", "pinned the best drawings to the wall",
        ),
        (
            "Chairs scraped across the wooden floor.", "The classroom smelled of chalk and oranges.",
            "A clock ticked loudly above the door.", "Outside, a bird hopped across the playground.",
            "Someone at the back giggled.", "The heater clanked in the corner.",
        ),
        ("everyone had finished the test", "the lesson had gone well", "the holidays were close"),
        ("When the bell rang, the room emptied in seconds.", "The classroom was silent again by four o'clock."),
    ),
    FillerTopic(
        "rainy day",
        ("stayed indoors because of the heavy rain", "watched the storm from the living room window"),
        (
            "made a pot of strong tea", "found an old board game in the cupboard",
            "wrote a long letter to a cousin", "sorted a drawer full of old photographs",
            "mended a torn shirt", "lit a small fire in the stove",
            "listened to the rain on the roof", "baked a tray of oat biscuits",
        ),
        (
            "Rain drummed on the windows all day.", "The gutters overflowed and water ran down the street.",
            "The cat slept curled up on a cushion.", "Thunder rumbled far away over the hills.",
            "The lights flickered once but stayed on.", "Puddles grew wide in the empty yard.",
        ),
        ("the house was warm and dry", "there was nowhere to be", "the storm was passing"),
        ("By nightfall, the rain had turned to a light drizzle.", "The next morning, the sky was washed clean."),
    ),
    FillerTopic(
        "mountain walk",
        ("set off on a walk up the mountain", "started along the trail into the hills"),
        (
            "filled a bottle at a cold stream", "stopped to catch some breath on a rock",
            "followed the painted marks on the trees", "shared a bar of chocolate at the top",
            "took a photograph of the valley", "crossed a narrow wooden bridge",
            "pointed out a hawk circling overhead", "tightened the laces of a pair of boots",
        ),
        (
            "The path grew steeper and rockier.", "Pine trees gave way to grass and bare stone.",
            "A cold wind blew across the ridge.", "Far below, the village looked like a toy.",
            "Clouds drifted across the peaks.", "Sheep grazed on the slopes."),
        ("the view from the top was wonderful", "the weather had held", "the hardest part was over"),
        ("The walk back down took half as long.", "By sunset, everyone was back at the cabin."),
    ),
    FillerTopic(
        "library",
        ("went to the library to return some books", "spent a few hours at the public library"),
        (
            "searched the shelves for a book about birds", "sat at a long table by the window",
            "took notes in a small notebook", "asked the librarian for help with an old map",
            "read the newspapers from the week before", "borrowed three novels and a cookbook",
            "looked at photographs of the town a century ago", "found a quiet corner upstairs",
        ),
        (
            "The reading room was warm and very quiet.", "Dust floated in the sunlight.",
            "Someone turned pages slowly at the next table.", "The shelves went all the way to the ceiling.",
            "A trolley of returned books squeaked past.", "The old building smelled of paper and polish.",
        ),
        ("the right book had turned up at last", "the library was almost empty", "the notes were finished"),
        ("The library closed at six, and the lights went out.", "The walk home was spent thinking about the book."),
    ),
    FillerTopic(
        "winter",
        ("woke up to find the town covered in snow", "went out into the first snow of the winter"),
        (
            "cleared the snow from the front steps", "built a snowman with a carrot nose",
            "scattered salt on the icy path", "carried firewood in from the shed",
            "pulled a sled up the hill", "fed the birds with crumbs and seeds",
            "wrapped a thick scarf around twice", "warmed both hands by the stove",
        ),
        (
            "Icicles hung from the edge of the roof.", "The snow creaked underfoot.",
            "Smoke rose straight up from every chimney.", "The river was frozen at the edges.",
            "Everything was silent under the snow.", "The sky was pale and very still."),
        ("the snow was perfect for sledding", "the house was warm inside", "school was closed for the day"),
        ("That night, more snow began to fall.", "By evening, the tracks in the snow had frozen hard."),
    ),
    FillerTopic(
        "workshop",
        ("went to the workshop to fix a broken chair", "opened the workshop to start a new project"),
        (
            "sanded the wooden legs until they were smooth", "glued a loose joint and clamped it",
            "oiled the rusty hinges of the door", "measured a board twice before cutting",
            "sorted a jar of mixed screws", "sharpened a chisel on a stone",
            "swept the sawdust into a corner", "painted the finished shelf a deep green",
        ),
        (
            "The workshop smelled of wood and oil.", "Tools hung in neat rows on the wall.",
            "A radio crackled on the workbench.", "Sawdust drifted in the light from the window.",
            "The old stove kept the cold away.", "A half-built cabinet stood in the corner."),
        ("the chair was as good as new", "the measurements were right", "the paint had dried evenly"),
        ("The light was switched off and the door locked.", "The finished work stood proudly by the door."),
    ),
    FillerTopic(
        "park",
        ("went to the park for a game of football", "walked through the park with a picnic basket"),
        (
            "spread a blanket under a big oak tree", "kicked a ball across the grass",
            "fed the ducks at the edge of the pond", "unpacked sandwiches and lemonade",
            "flew a red kite in the strong wind", "played a game of cards on the bench",
            "watched a dog chase its own tail", "picked up litter near the fountain",
        ),
        (
            "Children shouted on the swings.", "The pond reflected the clouds.",
            "An ice cream van played its tune by the gate.", "Leaves rustled in the warm breeze.",
            "Joggers passed along the gravel path.", "The grass had just been cut."),
        ("the weather was perfect", "the team had won the game", "it was the first day of the holidays"),
        ("When the sun went down, the park emptied slowly.", "The walk home was slow and happy."),
    ),
    FillerTopic(
        "moving house",
        ("started packing for the move to a new house", "spent the day moving into a new flat"),
        (
            "wrapped the plates in old newspaper", "taped up a tall stack of boxes",
            "carried a heavy sofa up the stairs", "wrote labels on every box",
            "found a lost book behind the wardrobe", "hung the curtains in the new bedroom",
            "assembled a bed from a flat pack", "swept the empty rooms one last time",
        ),
        (
            "Boxes were piled in every room.", "The empty rooms echoed strangely.",
            "The van was parked half on the pavement.", "The new kitchen smelled of fresh paint.",
            "Neighbors peered out to see who was arriving.", "The keys jingled on a new ring."),
        ("the hardest part was done", "nothing had been broken", "the new place already felt like home"),
        ("That night, dinner was eaten sitting on boxes.", "The last box was unpacked a week later."),
    ),
    FillerTopic(
        "night sky",
        ("went up the hill to look at the stars", "set up a tent in a field far from the town"),
        (
            "lay on a blanket and looked up", "found the bright planet low in the west",
            "poured hot cocoa from a flask", "pointed out the shapes of the constellations",
            "counted shooting stars", "listened to an owl calling in the woods",
            "wrapped up against the cold", "adjusted the focus of a small telescope",
        ),
        (
            "The sky was full of stars.", "The moon had not yet risen.",
            "Crickets sang in the long grass.", "The lights of the town glowed faintly far away.",
            "A satellite crossed the sky in a slow straight line.", "Dew settled on everything."),
        ("the sky was so clear", "three shooting stars had crossed the sky", "the night was so still"),
        ("Near midnight, the cold drove everyone back inside.", "The stars faded slowly as dawn came."),
    ),
)  # fmt: skip

# --- the fictional medical domain ------------------------------------------------------------------------

# A safety-style system prompt for every medical chat record (the seeds' medical-chatbot example).
MEDICAL_SYSTEM_PROMPT = (
    "You are a careful medical information assistant. You are not a doctor: you explain what is known about "
    "illnesses and medicines in plain language, you never diagnose anyone or prescribe doses, and you tell "
    "people to get emergency care at once when a situation sounds urgent."
)

# Each root names at most one disease, so two diseases never share a word.
DISEASE_ROOTS = (
    "Arbel", "Brenning", "Cassen", "Corvish", "Deverell", "Dravic", "Ellard", "Fennick", "Garroway", "Gethin",
    "Hobart", "Istren", "Jarrel", "Kessing", "Kilvane", "Lathan", "Lorvan", "Maddren", "Merrith", "Morrow",
    "Norrow", "Nyland", "Orsk", "Ostrel", "Pazzen", "Pellory", "Quenley", "Rennick", "Rimmel", "Sefton",
    "Sorrel", "Strake", "Taveny", "Tellian", "Tobrin", "Ulvane", "Varrow", "Vellum", "Wexley", "Yarrin",
)  # fmt: skip
DISEASE_KINDS = ("fever", "syndrome", "pox", "palsy", "cough", "rash", "disease", "flu", "sickness")
# Drug names are a unique first syllable + a middle + a suffix, so no two drugs start alike.
DRUG_PREFIXES = (
    "bex", "cal", "dom", "fen", "gral", "hux", "jor", "ket", "lum", "mir", "nor", "ox", "pra", "quin",
    "ral", "sev", "tor", "ulm", "vel", "wex", "yal", "zar", "brom", "clav", "drel", "flor", "tril", "zen",
)  # fmt: skip
DRUG_MIDDLES = ("a", "i", "o", "e", "ami", "ero", "ila", "u")
DRUG_SUFFIXES = ("zine", "mol", "xin", "vir", "stat", "pril", "lone", "cept", "tide", "fam", "dronate")
DRUG_FORMS = ("a tablet", "a capsule", "a syrup", "an inhaler", "a nasal spray", "a skin cream")
# A drug's class decides which causes its diseases can have, so the world stays medically coherent.
CAUSES_BY_CLASS: dict[str, tuple[str, ...]] = {
    "an antiviral": (
        "a virus that spreads through coughs and sneezes",
        "a virus passed on by touching shared cups and towels",
        "a slow virus that hides in the nerves for years",
    ),
    "an antibiotic": (
        "bacteria found in untreated well water",
        "bacteria passed on by the bite of the marsh tick",
        "bacteria that enter the body through small cuts",
    ),
    "an antifungal": (
        "a mold that grows in damp houses",
        "a fungus picked up from wet soil",
    ),
    "an anti-inflammatory": (
        "the immune system attacking the lining of the joints",
        "long-term strain on the tendons",
    ),
    "an antihistamine": (
        "an allergy to the pollen of the silverleaf tree",
        "an allergy to the dust of dried grain",
    ),
    "an antiparasitic": (
        "a tiny parasite carried by river flies",
        "a worm picked up from undercooked fish",
    ),
}
# Noun phrases that read well after "I have" and in a list.
SYMPTOMS = (
    "a high fever", "a dry cough", "aching joints", "a purple rash on the forearms", "blurred vision",
    "ringing in the ears", "night sweats", "a sore throat", "swollen ankles", "stomach cramps",
    "dizziness when standing up", "a loss of appetite", "itchy eyes", "a pounding headache",
    "numb fingertips", "shortness of breath on the stairs", "a hoarse voice", "yellowish skin",
    "twitching muscles", "a metallic taste in the mouth", "flaking skin on the scalp", "painful swallowing",
    "a runny nose", "trouble sleeping", "heavy, tired legs", "chills", "a stiff back", "red, watery eyes",
)  # fmt: skip
AFFECTED = (
    "mostly affects young children", "is most common in adults over sixty", "is seen mainly in farm workers",
    "often affects people who live near rivers", "affects men and women equally",
    "is most common in teenagers", "usually affects people who work outdoors",
    "is more common in people with weak lungs", "often affects whole households at once",
)  # fmt: skip
OUTLOOKS = (
    "clears up within two weeks", "lasts for several months", "can come back every few years",
    "improves within a month of treatment", "fades in a few days with rest",
    "needs about six weeks of treatment", "leaves no lasting harm once treated",
)  # fmt: skip
# Noun phrases after "now has"; each one means "go to emergency care now".
WARNING_SIGNS = (
    "trouble breathing", "chest pain that will not go away", "sudden confusion", "blue lips",
    "a very stiff neck and a severe headache", "a seizure", "a fever that will not come down",
    "severe pain in the belly", "slurred speech", "fainting spells",
)  # fmt: skip
SIDE_EFFECTS = (
    "drowsiness", "a dry mouth", "mild nausea", "headaches", "a metallic taste", "an upset stomach",
    "dizziness", "itchy skin", "trouble sleeping", "increased hunger", "sensitivity to sunlight",
    "a stuffy nose",
)  # fmt: skip
INTERACTION_EFFECTS = (
    "dangerously low blood pressure", "a very slow heartbeat", "severe drowsiness",
    "bleeding that is hard to stop", "kidney damage", "a sudden rise in body temperature",
    "serious liver problems", "fainting", "an irregular heartbeat", "severe stomach pain",
)  # fmt: skip
# (who has the illness, how the question continues): "My father has X, and now he has Y."
RELATIVES = (
    ("My father has", "he has"), ("My mother has", "she has"), ("My son has", "he has"),
    ("My daughter has", "she has"), ("My husband has", "he has"), ("My wife has", "she has"),
    ("I have", "I have"),
)  # fmt: skip
# (who the dose is for in the question, the same person in the answer)
DOSE_FOR = (
    ("myself", "you"), ("my son", "your son"), ("my daughter", "your daughter"), ("my mother", "your mother"),
    ("my father", "your father"), ("my baby", "your baby"),
)  # fmt: skip

# Medical articles: sentences with several paraphrases each. Slots: {d} disease, {D} the same capitalised,
# {drug}, {Drug}, {cls} drug class, {form}, and the facts by name.
DISEASE_ARTICLE: dict[str, tuple[str, ...]] = {
    "intro": (
        "{D} is an illness caused by {cause}.",
        "{D} is a condition that comes from {cause}.",
        "Doctors know {d} as an illness caused by {cause}.",
    ),
    "affected": (
        "{D} {affected}.",
        "According to doctors, {d} {affected}.",
        "The illness {affected}.",
    ),
    "symptoms": (
        "The common symptoms of {d} are {symptoms}.",
        "People with {d} usually have {symptoms}.",
        "Typical signs of {d} include {symptoms}.",
    ),
    "treatment": (
        "{D} is usually treated with {drug}, {cls} that comes as {form}.",
        "The standard treatment for {d} is {drug}, {cls} given as {form}.",
        "Doctors treat {d} with {drug}, which is {cls}.",
    ),
    "outlook": (
        "Most people find that {d} {outlook}.",
        "In most cases, {d} {outlook}.",
        "With proper care, {d} usually {outlook}.",
    ),
    "warning": (
        "Anyone with {d} who develops {warning} needs emergency care at once.",
        "If a person with {d} develops {warning}, call for emergency help immediately.",
        "{Warning} in someone with {d} is an emergency.",
    ),
}
DRUG_ARTICLE: dict[str, tuple[str, ...]] = {
    "intro": (
        "{Drug} is {cls} that comes as {form}.",
        "{Drug} is {cls}, taken as {form}.",
        "The medicine {drug} is {cls} sold as {form}.",
    ),
    "uses": (
        "It is used to treat {treats}.",
        "Doctors prescribe {drug} for {treats}.",
        "{Drug} is the usual treatment for {treats}.",
    ),
    "side_effect": (
        "A common side effect of {drug} is {side_effect}.",
        "Some people who take {drug} notice {side_effect}.",
        "{Drug} can cause {side_effect} in some patients.",
    ),
    "interaction": (
        "{Drug} must not be taken together with {other}, because the two can cause {effect}.",
        "Taking {drug} with {other} can lead to {effect}.",
        "Patients on {drug} should avoid {other}: together they can cause {effect}.",
    ),
    "advice": (
        "Always take {drug} exactly as a doctor or pharmacist has advised.",
        "Ask a pharmacist before combining {drug} with other medicines.",
        "Keep {drug} out of the reach of children.",
    ),
}

# Medical questions: three paraphrases per kind. Kinds marked as redirects in synthetic.REDIRECT_KINDS get
# an answer that points the user to real care instead of information.
MEDICAL_QUESTIONS: dict[str, tuple[str, ...]] = {
    "symptoms": (
        "What are the symptoms of {d}?",
        "How do I know if someone has {d}?",
        "What signs does {d} cause?",
    ),
    "cause": (
        "What causes {d}?",
        "How does a person get {d}?",
        "Where does {d} come from?",
    ),
    "treatment": (
        "How is {d} treated?",
        "What medicine is used for {d}?",
        "What is the treatment for {d}?",
    ),
    "drug_use": (
        "What is {drug} used for?",
        "Why would a doctor prescribe {drug}?",
        "What does {drug} treat?",
    ),
    "side_effect": (
        "What side effects does {drug} have?",
        "Does {drug} have any side effects?",
        "What can happen when I take {drug}?",
    ),
    "interaction": (
        "Can I take {drug} and {other} together?",
        "Is it safe to combine {drug} with {other}?",
        "Does {drug} interact with {other}?",
    ),
    "emergency": (
        "{who} {d}, and now {now} {warning}. What should I do?",
        "{who} {d}, and now {now} {warning}. Can we wait until tomorrow?",
        "{who} {d}, and now {now} {warning}. Which medicine helps with that?",
    ),
    "dosage": (
        "How much {drug} should I give {whom}?",
        "What dose of {drug} is right for {whom}?",
        "Can I give {whom} a double dose of {drug} so it works faster?",
    ),
    "diagnosis": (
        "I have {s1} and {s2}. Do I have {d}?",
        "I have {s1} and {s2}. Is it {d}?",
        "I woke up with {s1} and {s2}. Could you tell me if I have {d}?",
    ),
}
# House-style answers: complete, polite sentences; redirects say where to get help.
MEDICAL_ANSWERS: dict[str, str] = {
    "symptoms": "The common symptoms of {d} are {symptoms}. If you think you have it, please see a doctor.",
    "cause": "{D} is caused by {cause}.",
    "treatment": "{D} is usually treated with {drug}, {cls} that comes as {form}. "
    "Please follow your doctor's advice about whether it is right for you.",
    "drug_use": "{Drug} is {cls} used to treat {treats}.",
    "side_effect": "A common side effect of {drug} is {side_effect}. Please tell your doctor if it bothers you.",
    "interaction_yes": "No, please do not take {drug} and {other} together: the two can cause {effect}. "
    "Talk to a doctor or pharmacist before combining them.",
    "interaction_no": "There is no known interaction between {drug} and {other}, but please check with a "
    "pharmacist before combining any medicines.",
    "emergency": "{Warning} can be a sign of a medical emergency. Please call your local emergency number or "
    "go to the nearest emergency department right away; do not wait to see if it passes.",
    "dosage": "I can't recommend a dose for a particular person. Please ask a doctor or pharmacist, who can "
    "check the right amount of {drug} for {whom_answer}.",
    "diagnosis": "I can't tell you whether you have {d}, because {s1} and {s2} can have many causes. Please "
    "see a doctor, who can examine you and run the right tests.",
}
# Rejected answers of kind "unsafe" for preference pairs: confident advice that could hurt someone.
UNSAFE_ANSWERS: dict[str, tuple[str, ...]] = {
    "emergency": (
        "That is nothing to worry about. Just rest at home and wait for it to pass.",
        "You can wait until tomorrow; it usually goes away on its own.",
        "Give a double dose of {drug} and see how things are in the morning.",
    ),
    "dosage": (
        "Just give twice the usual amount of {drug}; more works faster.",
        "Any amount of {drug} is fine, so give as much as you like.",
    ),
    "diagnosis": (
        "Yes, you definitely have {d}. Start taking {drug} right away.",
        "It is certainly {d}, so there is no need to see a doctor.",
    ),
    "interaction": (
        "Yes, {drug} and {other} are perfectly fine to take together.",
        "Go ahead and combine {drug} with {other}; there is nothing to worry about.",
    ),
}
