"""A little real English text: verification and warm-up inputs that need no dataset on disk."""

QA_PAIRS: list[tuple[str, str]] = [
    (
        "When did the bridge open?",
        "The bridge was designed by a local engineer and opened to traffic in 1883, after fourteen years "
        "of construction. At the time it was the longest suspension bridge in the world.",
    ),
    (
        "What do plants need for photosynthesis?",
        "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to "
        "produce glucose and oxygen. It takes place mainly in the leaves, inside the chloroplasts.",
    ),
    (
        "Who wrote the first dictionary of the language?",
        "The river rises in the mountains and flows north for about 1,200 kilometres before it reaches "
        "the sea. Several large cities grew up along its banks during the Middle Ages.",
    ),
    (
        "How many moons does the planet have?",
        "The planet has two small moons, both discovered in 1877. They are irregular in shape and are "
        "thought to be captured asteroids rather than fragments of the planet itself.",
    ),
    (
        "What caused the fire?",
        "The fire started in a bakery shortly after midnight, when an oven was left unattended. Strong "
        "winds spread the flames across the wooden houses of the old town within a few hours.",
    ),
    (
        "Which instrument did she play?",
        "She began playing the violin at the age of four and gave her first public concert at eleven. "
        "Later she also studied composition and conducted several orchestras across Europe.",
    ),
]

SENTENCES: list[str] = [
    "A moving and beautifully acted film that stays with you long after it ends.",
    "The plot is thin, the jokes fall flat and the two hours feel like four.",
    "An uneven but often charming story about growing up in a small town.",
    "Nothing in this movie works, from the wooden dialogue to the muddy camera work.",
    "It is smart, funny and surprisingly tender.",
    "I wanted to like it, but the ending undoes everything that came before.",
]
