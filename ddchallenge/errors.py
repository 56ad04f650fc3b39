"""The exceptions the library raises. Each message is one line that says what
was wrong, what was expected and how to fix it; only cli.py turns them into
exit codes."""


class DDChallengeError(Exception):
    """Base of every error the library raises on purpose (exit code 1)."""


class UsageError(DDChallengeError):
    """An option or argument with an illegal value."""


class OptionMismatch(UsageError):
    """An option that contradicts what an upload says it is: a single file
    whose name or HDF5 header names a dataset that --dataset leaves out.
    The command line's mistake, not the upload's: never recorded against the
    upload, although only reading the upload (in the sandbox) can find it."""


class SubmissionError(DDChallengeError):
    """A submission file that is missing, unreadable, unsafe or malformed."""


class UploadRuleError(SubmissionError):
    """An upload that breaks the rules it is scored under (datasets, IPC)."""


class RuleMismatch(UploadRuleError):
    """An upload that is well formed but not what the rules of this run ask
    for (another IPC, a dataset they leave out, none of the datasets they
    require). Scoring one upload, it is the command line's mistake, like
    OptionMismatch (a typo in --ipc, a missing --dataset): refused, never
    recorded. In a batch the rules are the organiser's and the upload that
    breaks them has failed: recorded."""


class UploadChanged(SubmissionError):
    """The upload's bytes changed between the batch's hash and the scoring:
    not scored and not recorded (a record must name the bytes it scored)."""


class BudgetExceeded(DDChallengeError):
    """A timed run (a Track 2 generator, `generate --budget`) that did not
    finish inside its budget on this machine. A batch records it as such and
    scores the upload again when it runs with another budget."""


class DatasetError(DDChallengeError):
    """A dataset or reference test set that is missing or malformed."""


class RecordError(DDChallengeError):
    """A score record read back (a results folder, a leaderboard input) that is
    malformed, inconsistent or unsigned: the message names the file and field."""


class ResultsBusyError(DDChallengeError):
    """A results folder another batch is writing right now."""


class OutputExistsError(UsageError):
    """An output that exists and would be overwritten without --force: the
    command line's to change (exit 2, as any other refused output path)."""


class EnvironmentFailure(DDChallengeError):
    """The machine failed (out of disk or memory, a lost GPU, no sandbox), not
    the input: a batch retries the upload on its next run."""
