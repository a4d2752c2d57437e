-- Argo CD health check for parley.dev ChatCluster (written by the Parley operator: observedGeneration and the
-- conditions Ready, Progressing and Degraded, rolled up from the ChatCluster's Regions).
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
    hs.message = "Waiting for the operator to observe the ChatCluster"
  end
  return hs
end

local ready = condition(status, "Ready")
local progressing = condition(status, "Progressing")
local degraded = condition(status, "Degraded")

-- One of its Regions is Degraded (the message names them).
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = reason_and_message(degraded)
  return hs
end

-- One of its Regions is rolling out, scaling or paused mid-rollout (the message names them).
if progressing ~= nil and progressing.status == "True" then
  hs.status = "Progressing"
  hs.message = text(progressing.message)
  return hs
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = text(ready.message)
  return hs
end

-- No Region refers to the ChatCluster yet. It is fully reconciled: reporting Progressing here would hold an Argo CD
-- sync wave (or an app of apps) that creates the Regions after the ChatCluster forever.
if ready ~= nil and ready.reason == "NoRegions" then
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
