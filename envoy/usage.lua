-- Usage plumbing that must not cost Python a message per request or per chunk.
--
-- Request: when extproc marks a streamed request without include_usage (io.arks.add_usage_option),
-- set "include_usage":true in the body's own "stream_options" (added when missing or null; a
-- stream_options of another type is refused with a 400), so the engine reports usage. Only the
-- top-level object's keys are looked at, and the body is otherwise left byte for byte (no JSON
-- round trip, no number rounding). extproc marks only JSON objects holding "model" and "stream".
--
-- Response: read the numbers of the answer's last "usage" object into io.arks (and Envoy AI
-- Gateway's keys), without ever holding the whole answer: Envoy passes every chunk on as it comes
-- (an answer of any size goes through whole). A streamed answer keeps only its last few KiB: one
-- cheap step per data frame, nothing per SSE event. When this script added include_usage
-- (io.arks.usage_added), the engine's usage-only event (`"choices":[]`, then `usage`) is cut
-- from the stream: the client did not ask for it, and code indexing `chunk.choices[0]` would
-- fail on it. For that, an event split across data frames is withheld until its end arrives (a
-- few hundred bytes; never more than HOLD), and only a frame holding `"choices":[]` is split
-- into its events. A JSON answer is searched chunk by chunk for its last "usage" key, wherever
-- it is (other fields may follow it). Keys inside JSON strings have escaped quotes, so
-- '"usage":{' only matches a key. The access log carries the numbers to Python.
--
-- Samples, for a request whose answer reports no usage (extproc/estimate.py counts them at
-- settlement, only then). Taking them must cost next to nothing when usage comes back:
-- - the request's: its body's first PROMPT_SAMPLE bytes, when ext_proc admitted it without
--   counting its prompt (io.arks.prompt sample; ext_proc is not sent that namespace, only the
--   access log carries it). Raw, cut to whole UTF-8 characters: no per-byte step. The body is
--   valid UTF-8 (JSON that json_to_metadata parsed, which refuses ill-formed UTF-8; a body it did
--   not parse, extproc parsed and counted, and it is not sampled);
-- - a stream's first bytes, once SAMPLE_AT of them have passed (io.arks answer_head), for a
--   stream that is cut (then this script never reaches its end). Raw, cut to whole characters:
--   an engine writes its JSON in UTF-8;
-- - an answer that ended without usage (io.arks answer_sample): a JSON answer's first TAIL
--   bytes, a stream's last ones (the tail above). Written only then, so `%` and bytes above
--   0x7f are written %XX (a per-byte step), whatever the engine sent.
-- When usage is found, the samples already written are blanked, so the access log does not
-- carry them. A sample must be a valid protobuf string: a bad one would lose the access log's
-- whole batch.

local TAIL = 4096
local USAGE_WINDOW = 512 -- a usage object's numbers come first; details objects are small
local CARRY = 64 -- bytes kept across chunks so a key split between two is still found
local SAMPLE_AT = 2048 -- a stream's early sample, once this much of it has passed
local PROMPT_SAMPLE = 8192 -- the request body's head, for the prompt's estimate
local HOLD = 16384 -- the most of a stream's unfinished event withheld (a usage event is < 1 KiB)
local GC_EVERY = 65536 -- bytes of a stream copied into Lua between two garbage-collection steps
local GC_STEP_KB = 64 -- the size of such a step (LuaJIT: as if this many KiB were allocated)
local USAGE_OBJECT = '"usage"%s*:%s*{'
local ESCAPES = { ["%"] = "%25" }
for byte = 128, 255 do
  ESCAPES[string.char(byte)] = string.format("%%%02X", byte)
end

-- `text` with `%` and bytes above 0x7f written %XX.
local function escaped(text)
  return (string.gsub(text, "[%%\128-\255]", ESCAPES))
end

-- `text` (valid UTF-8 cut anywhere) without the parts of characters cut at its ends: at most
-- three bytes looked at on each side.
local function whole_chars(text)
  local first, last = 1, #text
  while first <= 3 and first <= last and string.byte(text, first) >= 128 and string.byte(text, first) < 192 do
    first = first + 1 -- a continuation byte: its character started before the sample
  end
  local lead = last
  while lead > last - 3 and lead > first and string.byte(text, lead) >= 128 and string.byte(text, lead) < 192 do
    lead = lead - 1
  end
  local b = string.byte(text, lead)
  if b ~= nil and b >= 192 then
    local length = b >= 240 and 4 or b >= 224 and 3 or 2
    if lead + length - 1 > last then
      last = lead - 1 -- the last character is cut short
    end
  end
  return string.sub(text, first, last)
end
local OPTION = '"stream_options":{"include_usage":true},'
local INCLUDE = '"include_usage":true'

-- Where the value of `key` starts in the JSON object opening at `open`: only that object's own
-- keys count, never one nested deeper (a tool's schema may have a property "stream_options").
-- Strings are skipped whole (escaped quotes included), so nothing inside one is taken for
-- structure. One step per structural character, not per byte.
local function member_value(text, open, key)
  local depth, pos = 1, open + 1
  while true do
    local s = string.find(text, '[{}%[%]"]', pos)
    if s == nil then
      return nil
    end
    local c = string.sub(text, s, s)
    if c == '"' then
      local e = s
      repeat
        e = string.find(text, '"', e + 1, true)
        if e == nil then
          return nil
        end
        local b = e - 1
        while string.byte(text, b) == 92 do -- a backslash
          b = b - 1
        end
      until (e - 1 - b) % 2 == 0
      pos = e + 1
      if depth == 1 then
        local _, colon = string.find(text, "^%s*:%s*", e + 1)
        if colon ~= nil then
          if string.sub(text, s + 1, e - 1) == key then
            return colon + 1
          end
          pos = colon + 1
        end
      end
    elseif c == "{" or c == "[" then
      depth, pos = depth + 1, s + 1
    else
      depth, pos = depth - 1, s + 1
      if depth == 0 then
        return nil
      end
    end
  end
end

local function refuse(handle, message)
  handle:respond(
    { [":status"] = "400", ["content-type"] = "application/json" },
    '{"error":{"message":"' .. message .. '","type":"invalid_request_error","code":"invalid_type"}}'
  )
end

-- What json_to_metadata cannot say: it reads an object, an array and null alike as "absent".
-- extproc marks a request whose `stream` was not read as true (io.arks.check_types); here the
-- body is searched for a suspect value (a pattern search, C speed) and only when one is found is
-- the top level walked to see whether it is the request's own key. `stream` must be a boolean or
-- null, `stream_options` an object or null.
local function type_error(text, top)
  if string.find(text, '"stream"%s*:%s*[{%[]') then
    local at = member_value(text, top, "stream")
    local c = at and string.sub(text, at, at)
    if c == "{" or c == "[" then
      return "'stream' must be a boolean."
    end
  end
  if string.find(text, '"stream_options"%s*:%s*[^%s{n]') then
    local at = member_value(text, top, "stream_options")
    local c = at and string.sub(text, at, at)
    if c ~= nil and c ~= "{" and c ~= "n" then
      return "'stream_options' must be an object."
    end
  end
  return nil
end

function envoy_on_request(handle)
  local arks = handle:streamInfo():dynamicMetadata():get("io.arks")
  if arks == nil then
    return -- not admitted by ext_proc
  end
  local keep_prompt = arks["prompt_estimate"] == nil -- else ext_proc counted the body it parsed
  local rewrite = arks["add_usage_option"] or arks["check_types"]
  if not (keep_prompt or rewrite) then
    return
  end
  local body = handle:body()
  if body == nil then
    return
  end
  local size = body:length()
  local text = rewrite and body:getBytes(0, size) or nil -- one copy of the body, read once
  if keep_prompt and size > 0 then
    local head = text and string.sub(text, 1, PROMPT_SAMPLE)
      or body:getBytes(0, math.min(size, PROMPT_SAMPLE))
    if size > PROMPT_SAMPLE then
      head = whole_chars(head)
    end
    -- (metadata is fetched again: objects taken before body() waited are out of scope)
    handle:streamInfo():dynamicMetadata():set("io.arks.prompt", "sample", head)
  end
  if not rewrite then
    return
  end
  local top = string.find(text, "{", 1, true) -- extproc marks JSON objects only
  if top == nil then
    return
  end
  if arks["check_types"] then
    local message = type_error(text, top)
    if message ~= nil then
      return refuse(handle, message)
    end
    return
  end
  local patched
  local options = member_value(text, top, "stream_options")
  if options == nil then
    patched = string.sub(text, 1, top) .. OPTION .. string.sub(text, top + 1)
  elseif string.sub(text, options, options) == "{" then
    local include = member_value(text, options, "include_usage")
    if include == nil then
      local rest = string.sub(text, options + 1)
      local separator = string.find(rest, "^%s*}") and "" or ","
      patched = string.sub(text, 1, options) .. INCLUDE .. separator .. rest
    elseif string.sub(text, include, include + 3) == "null" then
      patched = string.sub(text, 1, include - 1) .. "true" .. string.sub(text, include + 4)
    else
      return -- extproc saw no include_usage it could read: not a boolean (the engine decides)
    end
  elseif string.sub(text, options, options + 3) == "null" then
    patched = string.sub(text, 1, options - 1)
      .. '{"include_usage":true}'
      .. string.sub(text, options + 4)
  else
    return refuse(handle, "'stream_options' must be an object.")
  end
  body:setBytes(patched)
  handle:headers():replace("content-length", tostring(#patched))
  handle:streamInfo():dynamicMetadata():set("io.arks", "usage_added", true)
end

-- Where the unfinished event at the end of `text` starts, or nil when `text` ends an event
-- (SSE events end with a blank line: "\n\n", or "\r\n\r\n").
local function unfinished_at(text)
  if string.sub(text, -2) == "\n\n" or string.sub(text, -3) == "\n\r\n" then
    return nil
  end
  return string.match(text, "^.*\n\r?\n()") or 1
end

-- Where the next empty-choices key is in `text`, from `from` on: spelt as JSON encoders write
-- it, with or without a space (another spelling is not cut: it reaches the client as before).
-- Plain searches for "[]" (memchr on a byte a stream has about once per event; a search for the
-- key itself stops at every quote), then a look at what precedes it. Quotes inside JSON strings
-- are escaped, so only a key matches.
local function empty_choices_at(text, from)
  while true do
    local at = string.find(text, "[]", from, true)
    if at == nil then
      return nil
    end
    if at > 10 and string.sub(text, at - 10, at - 1) == '"choices":' then
      return at - 10
    end
    if at > 11 and string.sub(text, at - 11, at - 1) == '"choices": ' then
      return at - 11
    end
    from = at + 2
  end
end

-- The bounds of the event holding position `at` of `text`: from the end of the blank line
-- before it (looked for at most HOLD bytes back; `starts_event`: `text` begins an event) to the
-- end of the blank line after it. nil when its start is not in sight (then it is longer than
-- HOLD, or began before a window of the stream: not a usage event).
local function event_around(text, at, starts_event)
  local lo = math.max(1, at - HOLD)
  local start = string.match(string.sub(text, lo, at), "^.*\n\r?\n()")
  if start == nil and not (lo == 1 and starts_event) then
    return nil
  end
  local _, finish = string.find(text, "\n\r?\n", at)
  return lo + (start or 1) - 1, finish or #text
end

-- `events` (whole SSE events) without the usage-only one: its choices empty, its usage present.
-- Only the events around an empty-choices key are looked at: a stream's frame may hold
-- thousands of events (an engine faster than the client), and splitting it into them made
-- Envoy's CPU per 1,000-chunk answer ~15x what it is without the cut.
local function without_usage_event(events)
  local at = empty_choices_at(events, 1)
  if at == nil then
    return events
  end
  local kept, from = {}, 1
  while at ~= nil do
    local start, finish = event_around(events, at, true)
    if start ~= nil and string.find(string.sub(events, start, finish), USAGE_OBJECT) then
      kept[#kept + 1] = string.sub(events, from, start - 1)
      from = finish + 1
    end
    at = empty_choices_at(events, (finish or at) + 1)
  end
  kept[#kept + 1] = string.sub(events, from)
  return table.concat(kept)
end

-- Whether `data` is whole events none of which has an empty-choices key: the common frame,
-- passed on untouched after a plain search.
local function whole_events_without_empty_choices(data)
  local last = string.sub(data, -2)
  return (last == "\n\n" or (last == "\r\n" and string.sub(data, -4) == "\r\n\r\n"))
    and #data > 0
    and empty_choices_at(data, 1) == nil
end

-- What to pass on of a data frame `data` (`held`: what earlier frames withheld), and what to
-- withhold now. An empty frame lets everything go: Envoy's HTTP/1 codec ends an upstream's
-- chunked answer with one. (A stream ending in the middle of an event, in a frame that also
-- ends it, would lose that event's start; an engine's stream ends with "data: [DONE]\n\n".)
local function pass_on(held, data)
  local text = held == "" and data or held .. data
  local cut = #data > 0 and unfinished_at(text) or nil
  if cut == nil or #text - cut >= HOLD then
    return without_usage_event(text), ""
  end
  return without_usage_event(string.sub(text, 1, cut - 1)), string.sub(text, cut)
end

-- For a frame of `size` bytes (at least TAIL), nothing withheld before it, whose last TAIL
-- bytes are `last`: how many of its bytes to pass on, and what to withhold after them (rewritten)
-- until the next frame; nil when it passes untouched. The usage event is the last before [DONE],
-- so what must change is in `last`; the frame is cut where that starts. Whole, it would be
-- copied into Lua and rebuilt around the cut: an engine faster than Envoy sends a whole answer
-- in one frame, and each copy of one above 128 KiB is memory LuaJIT maps and unmaps.
local function split_frame(last, size)
  local cut = unfinished_at(last)
  if cut == 1 then
    cut = nil -- an unfinished event longer than TAIL: not a usage event, nothing to withhold
  end
  local whole = cut and string.sub(last, 1, cut - 1) or last
  local at = empty_choices_at(whole, 1)
  local start = at and event_around(whole, at, false)
  local first = start or cut
  if first == nil then
    return nil
  end
  local rest = without_usage_event(string.sub(whole, first)) .. (cut and string.sub(last, cut) or "")
  return size - #last + first - 1, rest
end

local function number_after(text, key)
  local value = string.match(text, '"' .. key .. '"%s*:%s*(%d+)')
  return value and tonumber(value)
end

local function last_usage(text)
  local from, start, search = nil, nil, 1
  while true do
    local s, e = string.find(text, '"usage"%s*:%s*{', search)
    if e == nil then
      break
    end
    from, start, search = e, s, e + 1
  end
  return from, start
end

local function sample(handle, text)
  handle:streamInfo():dynamicMetadata():set("io.arks", "answer_sample", escaped(text))
end

-- Nothing to estimate (usage found, or an error answer): the prompt's sample leaves the access log.
local function settled(handle)
  handle:streamInfo():dynamicMetadata():set("io.arks.prompt", "sample", "")
end

-- True when the answer's usage was found and recorded.
local function record_usage(handle, text)
  local from = last_usage(text)
  if from == nil then
    return false
  end
  -- Its numbers come first; details objects (cached tokens …) are small.
  local usage = string.sub(text, from, from + 512)
  local metadata = handle:streamInfo():dynamicMetadata()
  -- A transcription's: {"type":"duration","seconds":S} (vLLM, an integer; OpenAI, a number),
  -- no tokens; or {"type":"tokens","input_tokens":..,"output_tokens":..}.
  local seconds = string.match(usage, '"seconds"%s*:%s*(%d+%.?%d*)')
  if seconds ~= nil then
    metadata:set("io.arks", "audio_seconds", tonumber(seconds))
  end
  local total = number_after(usage, "total_tokens")
  -- vLLM's rerank before prompt_tokens was added to its usage reports the total only: all prompt.
  -- The Responses API and Anthropic's Messages name them input_tokens and output_tokens.
  local prompt = number_after(usage, "prompt_tokens") or number_after(usage, "input_tokens") or total
  if prompt == nil then
    prompt = seconds ~= nil and 0 or nil
  end
  if prompt == nil then
    return false
  end
  local completion = number_after(usage, "completion_tokens") or number_after(usage, "output_tokens") or 0
  total = total or (prompt + completion)
  metadata:set("io.arks", "prompt_tokens", prompt)
  metadata:set("io.arks", "completion_tokens", completion)
  metadata:set("io.arks", "total_tokens", total)
  metadata:set("io.envoy.ai_gateway", "llm_input_token", prompt)
  metadata:set("io.envoy.ai_gateway", "llm_output_token", completion)
  metadata:set("io.envoy.ai_gateway", "llm_total_token", total)
  return true
end

-- A stored response's id (POST /v1/responses, marked io.arks.stored_response by extproc): the
-- first "id" of the answer, the response object's own (a stream's first event holds the object).
-- The access log carries it to extproc, which remembers the engine that holds the response.
local function record_response_id(handle, text)
  local id = string.match(text, '"id"%s*:%s*"([^"\\]+)"')
  if id ~= nil then
    handle:streamInfo():dynamicMetadata():set("io.arks", "response_id", id)
  end
end

function envoy_on_response(handle)
  local headers = handle:headers()
  local stored = headers:get(":status") == "200"
    and (handle:streamInfo():dynamicMetadata():get("io.arks") or {})["stored_response"] == true
  local content_type = headers:get("content-type") or ""
  if string.find(content_type, "text/event-stream", 1, true) then
    local arks = handle:streamInfo():dynamicMetadata():get("io.arks")
    local cut_usage = arks ~= nil and arks["usage_added"] == true
    local tail, seen, sampled, recorded, held, copied = "", 0, false, false, "", 0
    for chunk in handle:bodyChunks() do
      local size = chunk:length()
      if seen == 0 and size > 0 then
        -- The first content byte on its way to the client (headers go at once, before the first
        -- token): the time to first token, in ms since the epoch, as Envoy's request start_time.
        handle:streamInfo():dynamicMetadata():set("io.arks", "first_byte_ms", handle:timestamp())
        if stored then
          record_response_id(handle, chunk:getBytes(0, math.min(size, 1024)))
        end
      end
      local data = size < TAIL and chunk:getBytes(0, size) or nil
      if size >= TAIL then
        tail = chunk:getBytes(size - TAIL, TAIL) -- the frame's own last TAIL bytes
      elseif size > 0 then
        tail = tail .. data
        if #tail > 2 * TAIL then
          tail = string.sub(tail, -TAIL)
        end
      end
      -- The usage event is the last before [DONE]: a frame ending an event with no empty choices
      -- in its last TAIL bytes is passed on untouched, whatever its size, never copied whole.
      if cut_usage and (held ~= "" or (size > 0 and not whole_events_without_empty_choices(data or tail))) then
        -- (setBytes also sets the sent headers' content-length: they are gone already)
        if data == nil and held == "" then
          local keep, rest = split_frame(tail, size)
          if keep ~= nil then
            chunk:setBytes(keep > 0 and chunk:getBytes(0, keep) or "")
            held = rest
          end
        else
          data = data or chunk:getBytes(0, size)
          local out
          out, held = pass_on(held, data)
          if out ~= data then
            chunk:setBytes(out)
          end
        end
        -- The frame was copied into Lua strings: collect as we go, or a long stream of such
        -- frames piles up garbage faster than Lua's own pace collects it
        -- (tests/chaos/test_slow_clients.py: +75 MiB of Envoy memory for ten 50,000-token
        -- streams without this).
        copied = copied + size
        if copied >= GC_EVERY then
          copied = 0
          collectgarbage("step", GC_STEP_KB)
        end
      end
      seen = seen + size
      if not sampled and seen >= SAMPLE_AT then
        sampled = true
        local head = whole_chars(string.sub(tail, 1, SAMPLE_AT))
        handle:streamInfo():dynamicMetadata():set("io.arks", "answer_head", head)
      end
      -- The stream's last event: its usage is in the tail now. Record it at once: a client that
      -- closes on [DONE] may reset the stream before Envoy sees its end (this loop then stops).
      if not recorded and size > 0 and string.find(tail, "[DONE]", math.max(1, #tail - size - 8), true) then
        recorded = record_usage(handle, tail)
        if recorded then
          settled(handle)
          if sampled then
            handle:streamInfo():dynamicMetadata():set("io.arks", "answer_head", "")
          end
        end
      end
    end
    if not recorded then
      if sampled then
        handle:streamInfo():dynamicMetadata():set("io.arks", "answer_head", "")
      end
      if record_usage(handle, tail) then
        settled(handle)
      else
        sample(handle, string.sub(tail, -TAIL))
      end
    end
  elseif headers:get(":status") ~= "200" then
    settled(handle) -- an error answer: it carries no usage and nothing is owed
  elseif string.find(content_type, "json", 1, true) then
    local carry, found = "", nil -- found: the last usage key and what follows it
    local head = "" -- the answer's first TAIL bytes, to estimate it if it reports no usage
    for chunk in handle:bodyChunks() do
      local size = chunk:length()
      if size > 0 then
        local text = carry .. chunk:getBytes(0, size)
        if #head < TAIL then
          head = head .. string.sub(text, #carry + 1, #carry + TAIL - #head)
        end
        if found ~= nil and #found < USAGE_WINDOW then
          found = found .. string.sub(text, #carry + 1, #carry + USAGE_WINDOW)
        end
        local _, start = last_usage(text)
        if start ~= nil then
          found = string.sub(text, start, start + USAGE_WINDOW)
        end
        carry = string.sub(text, -CARRY)
      end
    end
    if stored then
      record_response_id(handle, head)
    end
    if found ~= nil and record_usage(handle, found) then
      settled(handle)
    else
      sample(handle, head)
    end
  end
end
