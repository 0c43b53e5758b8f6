-- Orthanc: send every stable study to the medsam2-cxr node.
-- The node recognises and skips its own results if they come back, so routing the whole study
-- is safe; skipping them here too saves the traffic.
function OnStableStudy(studyId, tags, metadata)
  local instances = ParseJson(RestApiGet('/studies/' .. studyId .. '/instances'))
  local toSend = {}
  for i, instance in pairs(instances) do
    local t = ParseJson(RestApiGet('/instances/' .. instance['ID'] .. '/simplified-tags'))
    if t['Manufacturer'] ~= 'medsam2-cxr' then
      table.insert(toSend, instance['ID'])
    end
  end
  if #toSend > 0 then
    RestApiPost('/modalities/medsam2/store', DumpJson(toSend, true))
  end
end
