"""The ``test_digits`` task of the trainer / reporting / plot tests: sums of two small numbers, with partial
credit for digits so that a random tiny policy gets varied, non-zero rewards within each group.  Importing
this module registers it."""

from latentx.tasks import FunctionTask, register_task


def digit_reward(inst, response: str) -> float:
    return sum(ch.isdigit() for ch in response) / max(len(response), 1)


def make_sum(rng):
    a, b = rng.randint(1, 40), rng.randint(1, 40)
    return f"{a} {b}>", str(a + b)


register_task(
    "test_digits",
    lambda **options: FunctionTask("test_digits", reward_fn=digit_reward, generate=make_sum, **options),
    overwrite=True,
)
