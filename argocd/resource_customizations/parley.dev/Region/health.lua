-- Argo CD health check for parley.dev Region (written by the Parley operator: observedGeneration, the conditions
-- Ready, Progressing and Degraded, and status.rollout while gateways are being replaced).
-- Uses only Lua's base library, so it runs from argocd-cm without resource.customizations.useOpenLibs.
local hs = {}

local function condition(status, wanted)
  if type(status.conditions) ~= "table" then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == wanted then
      return c
    end
  end
  return nil
end

local function text(value)
  if value == nil then
    return ""
  end
  return tostring(value)
end

local function reason_and_message(c)
  local reason, message = text(c.reason), text(c.message)
  if reason == "" then
    return message
  end
  if message == "" then
    return reason
  end
  return reason .. ": " .. message
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
local status = obj.status

-- Not reconciled yet, or not since the spec last changed.
if type(status) ~= "table" or status.observedGeneration == nil or
    (generation ~= nil and status.observedGeneration ~= generation) then
  hs.status = "Progressing"
  if generation ~= nil then
    hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  else
    hs.message = "Waiting for the operator to observe the Region"
  end
  return hs
end

local ready = condition(status, "Ready")
local progressing = condition(status, "Progressing")
local degraded = condition(status, "Degraded")
local rollout = status.rollout
if type(rollout) ~= "table" then
  rollout = nil
end

-- The spec cannot be applied, or a mirror flow is over its latency budget.
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = reason_and_message(degraded)
  return hs
end

-- The parley.dev/rollout-paused annotation holds the rollout: no new drain or replace step, no scale-down.
local progressing_true = progressing ~= nil and progressing.status == "True"
if (rollout ~= nil and rollout.paused == true) or (progressing_true and progressing.reason == "RolloutPaused") then
  hs.status = "Suspended"
  if rollout ~= nil and text(rollout.message) ~= "" then
    hs.message = rollout.message
  elseif progressing_true and text(progressing.message) ~= "" then
    hs.message = progressing.message
  else
    hs.message = "Rollout paused by the parley.dev/rollout-paused annotation"
  end
  return hs
end

-- A rollout (RollingOut: gateways replaced one at a time, or pods still starting), a scale step (Scaling), or
-- another wait (WaitingForReplicationTarget). During a gateway rollout status.rollout says where it is.
if progressing_true then
  hs.status = "Progressing"
  local message = text(progressing.message)
  if progressing.reason == "RollingOut" and rollout ~= nil and rollout.phase ~= "Idle" then
    local counts = ""
    if rollout.updated ~= nil and rollout.total ~= nil then
      counts = tostring(rollout.updated) .. "/" .. tostring(rollout.total) .. " gateways updated"
    end
    local rollout_message = text(rollout.message)
    if rollout_message ~= "" and counts ~= "" then
      message = rollout_message .. " (" .. counts .. ")"
    elseif rollout_message ~= "" then
      message = rollout_message
    elseif counts ~= "" then
      message = counts
    end
  end
  hs.message = message
  return hs
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = text(ready.message)
  return hs
end

hs.status = "Progressing"
if ready ~= nil then
  hs.message = text(ready.message)
else
  hs.message = "Waiting for the operator to report the Ready condition"
end
return hs
