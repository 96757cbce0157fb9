-- Usage plumbing that must not cost Python a message per request or per chunk.
--
-- Request: when extproc marks a streamed request without include_usage (io.arks.add_usage_option),
-- add "include_usage":true to the client's "stream_options" object, or add that object right after
-- the body's opening brace, so the engine reports usage. The body is otherwise left byte for byte
-- (no JSON round trip, no number rounding). Quotes inside JSON strings are escaped, so the key
-- pattern only matches a key. extproc marks only JSON objects holding "model" and "stream".
--
-- Response: read the numbers of the answer's last "usage" object into io.arks (and Envoy AI
-- Gateway's keys). For a streamed answer only its last few KiB are kept: one cheap step per data
-- frame, nothing per SSE event. A JSON answer is whole anyway. Keys inside JSON strings have
-- escaped quotes, so '"usage":{' only matches a key. The access log carries the numbers to Python.

local TAIL = 4096
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
  local from, search = nil, 1
  while true do
    local _, e = string.find(text, '"usage"%s*:%s*{', search)
    if e == nil then
      break
    end
    from, search = e, e + 1
  end
  return from
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
      return -- an error answer carries no usage; do not buffer it
    end
    local body = handle:body()
    if body ~= nil then
      record_usage(handle, body:getBytes(0, body:length()))
    end
  end
end
