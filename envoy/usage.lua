-- Usage plumbing that must not cost Python a message per request or per chunk.
--
-- Request: when extproc marks a streamed request without include_usage (io.arks.add_usage_option),
-- add "include_usage":true to the client's "stream_options" object, or add that object right after
-- the body's opening brace, so the engine reports usage. The body is otherwise left byte for byte
-- (no JSON round trip, no number rounding). Quotes inside JSON strings are escaped, so the key
-- pattern only matches a key. extproc marks only JSON objects holding "model" and "stream".
--
-- Response: read the numbers of the answer's last "usage" object into io.arks (and Envoy AI
-- Gateway's keys), without ever holding the whole answer: Envoy passes every chunk on as it comes
-- (an answer of any size goes through whole). A streamed answer keeps only its last few KiB: one
-- cheap step per data frame, nothing per SSE event. A JSON answer is searched chunk by chunk for
-- its last "usage" key, wherever it is (other fields may follow it). Keys inside JSON strings
-- have escaped quotes, so '"usage":{' only matches a key. The access log carries the numbers to
-- Python.

local TAIL = 4096
local USAGE_WINDOW = 512 -- a usage object's numbers come first; details objects are small
local CARRY = 64 -- bytes kept across chunks so a key split between two is still found
local OPTION = '"stream_options":{"include_usage":true},'
local INCLUDE = '"include_usage":true'

function envoy_on_request(handle)
  local arks = handle:streamInfo():dynamicMetadata():get("io.arks")
  if arks == nil or not arks["add_usage_option"] then
    return
  end
  local body = handle:body()
  if body == nil then
    return
  end
  local text = body:getBytes(0, body:length())
  local patched, nulls = string.gsub(text, '("include_usage"%s*:%s*)null', "%1true", 1)
  local _, open = string.find(text, '"stream_options"%s*:%s*{')
  if nulls == 1 then
    -- "include_usage": null was given: set it (an inserted key before it would be overridden)
  elseif open ~= nil then
    local rest = string.sub(text, open + 1)
    local separator = string.find(rest, "^%s*}") and "" or ","
    patched = string.sub(text, 1, open) .. INCLUDE .. separator .. rest
  else
    if string.find(text, '"stream_options"', 1, true) then
      return -- stream_options is not an object (null?): leave it; usage will be estimated
    end
    local brace = string.find(text, "{", 1, true)
    if brace == nil then
      return
    end
    patched = string.sub(text, 1, brace) .. OPTION .. string.sub(text, brace + 1)
  end
  body:setBytes(patched)
  handle:headers():replace("content-length", tostring(#patched))
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

local function record_usage(handle, text)
  local from = last_usage(text)
  if from == nil then
    return
  end
  -- Its numbers come first; details objects (cached tokens …) are small.
  local usage = string.sub(text, from, from + 512)
  local prompt = number_after(usage, "prompt_tokens")
  if prompt == nil then
    return
  end
  local completion = number_after(usage, "completion_tokens") or 0 -- embeddings report none
  local total = number_after(usage, "total_tokens") or (prompt + completion)
  local metadata = handle:streamInfo():dynamicMetadata()
  metadata:set("io.arks", "prompt_tokens", prompt)
  metadata:set("io.arks", "completion_tokens", completion)
  metadata:set("io.arks", "total_tokens", total)
  metadata:set("io.envoy.ai_gateway", "llm_input_token", prompt)
  metadata:set("io.envoy.ai_gateway", "llm_output_token", completion)
  metadata:set("io.envoy.ai_gateway", "llm_total_token", total)
end

function envoy_on_response(handle)
  local content_type = handle:headers():get("content-type") or ""
  if string.find(content_type, "text/event-stream", 1, true) then
    local tail = ""
    for chunk in handle:bodyChunks() do
      local size = chunk:length()
      if size >= TAIL then
        tail = chunk:getBytes(size - TAIL, TAIL)
      elseif size > 0 then
        tail = tail .. chunk:getBytes(0, size)
        if #tail > 2 * TAIL then
          tail = string.sub(tail, -TAIL)
        end
      end
    end
    record_usage(handle, tail)
  elseif string.find(content_type, "json", 1, true) then
    local status = handle:headers():get(":status")
    if status ~= "200" then
      return -- an error answer carries no usage
    end
    local carry, found = "", nil -- found: the last usage key and what follows it
    for chunk in handle:bodyChunks() do
      local size = chunk:length()
      if size > 0 then
        local text = carry .. chunk:getBytes(0, size)
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
    if found ~= nil then
      record_usage(handle, found)
    end
  end
end
