from relman.entry import run

run()
