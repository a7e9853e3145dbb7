"""The main process decides, every process receives: a decision that reads or changes shared files (the output
directory, the bucket, a trained tokenizer, the best score so far) is taken once, by the main process, and its
outcome (or the user error it ended in) reaches every process, so that all of them go on, or stop, alike."""

from accelerate.utils import broadcast_object_list

from ttt_train.cli import UserError


def main_decides(accelerator, decide):
    """`decide()` on the main process; its result on every process. A UserError it raises is raised by every
    process with the same message (alone, the process raises it as it came)."""
    if accelerator.num_processes == 1:
        return decide()
    outcome = [None, None]  # the result, the error's message
    if accelerator.is_main_process:
        try:
            outcome[0] = decide()
        except UserError as error:
            outcome[1] = str(error)
    result, error = broadcast_object_list(outcome)
    if error:
        raise UserError(error)
    return result
