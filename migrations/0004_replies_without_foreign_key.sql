-- A reply is only ever written by the statement that marks its message processed, in the
-- same statement, so the foreign key checked nothing that can happen; its per-row trigger
-- (a lookup and a row lock on the message) cost about 15 % of completion throughput.
-- Exactly one reply per message is still the primary key's job.
ALTER TABLE shoal_replies DROP CONSTRAINT shoal_replies_message_id_fkey;
