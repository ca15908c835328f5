-- pgweir catalog, version 2: usage is written exactly once. Each instance numbers its usage flushes; a flush whose
-- number is already recorded (its commit went through but the answer was lost) is not added again.
CREATE TABLE pgweir.usage_flushes (
    instance    text NOT NULL,
    seq         bigint NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance, seq)
);
